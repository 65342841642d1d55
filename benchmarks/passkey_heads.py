"""Passkey accuracy under head policies, side by side on the same samples, with the KV bytes the cache really held.

    python benchmarks/passkey_heads.py --lengths 1024 2048 3072 4096 --depths 10 \
        --policies heads=all heads=none heads=duo:0.5 heads=random:0.5 ... [--profile P] [--json]

Each sample: one key at a depth of the haystack (`--format numeric`: the classic 5-digit pass key stated twice in
repeated filler; `pydoc`: the same key in Python documentation text;
`nato`: kvtool's calibration format), the prompt ends right before the answer; after a chunked prefill into a
CompressedCache the answer is greedy-decoded and counts when the key appears in it. Streaming
heads keep `sink` + `recent` tokens (set in the policy, default 64 + 256). Bytes: what the cache holds (16-bit
stores), per sample, against a 16-bit full cache of the same tokens.
"""

from __future__ import annotations

import argparse
import json

import kvtool
import torch

from kvtool.evaluate import default_depths, passkey_grid, run_passkey
from kvtool.profile import Profile

SHIPPED = "profiles/smollm2-135m-instruct.kv.st"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--words", type=int, default=5, help="NATO words per key (--format nato)")
    ap.add_argument("--format", default="numeric", choices=["numeric", "pydoc", "nato"])
    ap.add_argument("--policies", nargs="+", default=["heads=all", "heads=none", "heads=duo:0.5", "heads=random:0.5"])
    ap.add_argument("--profile", default=SHIPPED)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvtool.load_model()
    profile = Profile.load(args.profile, model=model)
    samples = passkey_grid(tok, args.lengths, default_depths(args.depths), words=args.words, fmt=args.format)
    rows, reference = [], None
    for policy in args.policies:
        r = run_passkey(model, tok, samples, policy, profile)
        reference = reference or r.hits                       # the first policy is the reference (put heads=all first)
        kept = sum(a and b for a, b in zip(reference, r.hits))
        rows.append({"policy": policy, "correct": r.correct, "total": r.samples,
                     "kept_of_first": f"{kept}/{sum(reference)}",
                     "kv_MiB_per_sample": round(r.kv_bytes / 2**20, 2), "x_smaller_than_16bit": round(r.ratio, 2),
                     "seconds": round(r.seconds, 1), "hits": "".join("1" if h else "0" for h in r.hits)})
        if not args.json:
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
