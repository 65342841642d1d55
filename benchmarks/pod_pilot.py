"""PoD shared keys, pilot: continuation NLL and bytes of the full cache vs `pod=on` / `pod=map`
(kvtool/stores/shared.py) on the embedded model. A pilot (2 contexts of 1024 + 64 tokens), not the issue's benchmark.

    python benchmarks/pod_pilot.py --threshold 0.5 --specs "heads=all;heads=all,pod=on;heads=all,pod=map"

Copies profiles/smollm2-135m-instruct.kv.st, runs `kvtool.api.calibrate(model, tok, "pod", ...)` on it (2 samples of
512 tokens for the maps, 1 held out), then kvtool.evaluate.run_nll on nll_samples(tok, 2, 1024, 64, seed=0), as
`kvtool run` does. Prints one line per spec: NLL, its change vs the first spec, bytes held and bytes saved vs 16-bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtool import api  # noqa: E402
from kvtool.evaluate import nll_samples, run_nll  # noqa: E402
from kvtool.models import load_model  # noqa: E402
from kvtool.profile import Profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--specs", default="heads=all;heads=all,pod=on;heads=all,pod=map")
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    prof = Profile.load(ROOT / "profiles" / "smollm2-135m-instruct.kv.st", model=model)
    prof = api.calibrate(model, tok, "pod", profile=prof,
                         options=dict(samples=2, heldout=1, seq_len=512, threshold=args.threshold))
    leader = prof["layers.pod.leader"][:, 0]
    members = int((leader != torch.arange(len(leader))).sum())
    print(f"threshold {args.threshold}: {members} member layers of {len(leader)}")
    samples = nll_samples(tok, args.contexts, args.context, args.continuation, seed=0)
    base = None
    for spec in args.specs.split(";"):
        r = run_nll(model, samples, spec, prof, chunk=512, decode_steps=2)
        base = r.nll if base is None else base
        print(f"{spec:45s} nll {r.nll:.4f} ({100 * (r.nll / base - 1):+.2f}%)  bytes {r.kv_bytes / 2**20:.2f} MiB  "
              f"saved {100 * (1 - r.kv_bytes / r.full16_bytes):.1f}%", flush=True)


if __name__ == "__main__":
    main()
