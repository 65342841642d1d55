"""Which heads carry the pass key at 25% retrieval heads? Single-head swaps on the 1k slice of the passkey grid.

    python benchmarks/passkey_head_swaps.py [--profile P]

The 10 one-thousand-token samples of `passkey_heads.py` (depths 0.1-0.9), the shipped profile, 22 retrieval heads per
variant (the top 25% of a method's score, with heads swapped in for that method's lowest-scored picks, or out for the
next-best copy-score heads), streaming heads 64 + 256. Each variant's mask goes into the loaded profile as
`heads.test.mask` and runs with policy `heads=test`.
"""

from __future__ import annotations

import argparse

import torch

import kvtool
from calibrate.heads import top_fraction
from kvtool.evaluate import default_depths, passkey_grid, run_passkey
from kvtool.profile import Profile


def swap_in(mask, score, heads):
    """Put `heads` in, dropping the mask's lowest-scored other heads (same count)."""
    m = mask.clone()
    low = sorted((float(score[l, h]), l, h) for l, h in m.nonzero().tolist() if (l, h) not in heads)[:len(heads)]
    for _, l, h in low:
        m[l, h] = 0
    for l, h in heads:
        m[l, h] = 1
    return m, [(l, h) for _, l, h in low]


def swap_out(mask, score, heads):
    """Take `heads` out, adding the next-best heads by `score` (same count)."""
    m, s = mask.clone(), score.clone()
    s[mask.bool()] = -1
    for l, h in heads:
        m[l, h], s[l, h] = 0, -1
    added = [divmod(i, mask.shape[1]) for i in torch.topk(s.flatten(), len(heads)).indices.tolist()]
    for l, h in added:
        m[l, h] = 1
    return m, added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="profiles/smollm2-135m-instruct.kv.st")
    args = ap.parse_args()
    model, tok = kvtool.load_model()
    prof = Profile.load(args.profile, model=model)
    samples = passkey_grid(tok, [1024, 2048, 3072, 4096], default_depths(10))[:10]          # the 1k slice
    duo_s, ret_s, raz_s = (prof[f"heads.{m}.score"] for m in ("duo", "retrieval", "razor"))
    duo, ret, raz = (top_fraction(s, 0.25) for s in (duo_s, ret_s, raz_s))
    variants = {"duo25 + 19.1, 29.2": swap_in(duo, duo_s, [(19, 1), (29, 2)]),
                "duo25 + 21.1": swap_in(duo, duo_s, [(21, 1)]),
                "retrieval25 - 19.1, 29.2": swap_out(ret, ret_s, [(19, 1), (29, 2)]),
                "razor25 + 14.0": swap_in(raz, raz_s, [(14, 0)])}
    for name, (mask, changed) in variants.items():
        prof.tensors["heads.test.mask"] = mask.to(torch.uint8)
        r = run_passkey(model, tok, samples, "heads=test", prof)
        hits = "".join("1" if h else "0" for h in r.hits)
        print(f"{name}: {r.correct}/{r.samples} {hits} (other heads changed: {changed})", flush=True)


if __name__ == "__main__":
    main()
