"""Passkey accuracy under head policies, side by side on the same samples, with the KV bytes the cache really held.

    python benchmarks/passkey_heads.py --lengths 1024 2048 3072 4096 --depths 10 \
        --policies heads=all heads=none heads=duo:0.5 heads=random:0.5 ... [--profile P] [--json]

Each sample: one key at a depth of the haystack (`--format numeric`: the classic 5-digit pass key stated twice;
`nato`: kvtool's calibration format), the prompt ends right before the answer; after a chunked prefill into a
CompressedCache the answer is greedy-decoded and counts when the key appears in it. Streaming
heads keep `sink` + `recent` tokens (set in the policy, default 64 + 256). Bytes are in the model's dtype.
"""

from __future__ import annotations

import argparse
import json

import kvtool
from kvtool.evaluate import default_depths, passkey_accuracy, passkey_grid
from kvtool.profile import Profile

SHIPPED = "profiles/smollm2-135m-instruct.kv.st"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--words", type=int, default=5, help="NATO words per key (--format nato)")
    ap.add_argument("--format", default="numeric", choices=["numeric", "nato"])
    ap.add_argument("--policies", nargs="+", default=["heads=all", "heads=none", "heads=duo:0.5", "heads=random:0.5"])
    ap.add_argument("--profile", default=SHIPPED)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, tok = kvtool.load_model()
    profile = Profile.load(args.profile, model=model)
    samples = passkey_grid(tok, args.lengths, default_depths(args.depths), words=args.words, fmt=args.format)
    rows = []
    for policy in args.policies:
        r = passkey_accuracy(model, tok, samples, policy, profile)
        rows.append({"policy": policy, "correct": r.correct, "total": r.total, "kv_MiB": round(r.kv_bytes / 2**20, 2),
                     "full_MiB": round(r.full_bytes / 2**20, 2), "x_smaller": round(r.ratio, 2),
                     "seconds": round(r.seconds, 1)})
        if not args.json:
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
