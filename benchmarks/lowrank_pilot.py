"""Pilot for the low-rank store: continuation NLL of the embedded model (SmolLM2-135M-Instruct, float32 on CPU),
full cache vs low-rank / quantized policies, on `--samples` contexts of `--context` + `--continuation` tokens of the
built-in text (kvtool.evaluate.nll_samples / run_nll, as `kvtool run --task nll` calls them).

    python benchmarks/lowrank_pilot.py                                  # 2 x (1024 + 64), the four specs below
    python benchmarks/lowrank_pilot.py --specs "heads=all,krank=32,vrank=32,k=4,v=4"

The shipped profile is copied to a temporary directory and calibrated there with `kvtool.api.calibrate(..., "pca",
options={"samples": 2, "seq_len": 512, "max_points": 2048})` (small, for speed); the shipped file is not touched.
Prints one JSON line per spec, then the per-layer (key, value) ranks of each low-rank spec. A pilot, not the
issue's benchmark (which asks for >= 6 contexts of 2k + 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SPECS = ["full", "heads=all,krank=auto:0.99,vrank=auto:0.99", "heads=all,krank=auto:0.99,vrank=auto:0.99,k=4,v=4",
         "heads=all,k=4,v=4,krope=pre"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--specs", default=";".join(SPECS), help="cache specs separated by ';'")
    args = ap.parse_args()

    import kvtool
    from kvtool.api import calibrate
    from kvtool.cache import CompressedCache
    from kvtool.evaluate import nll_samples, run_nll
    from kvtool.lowrank_setup import layer_ranks
    from kvtool.profile import Profile

    torch.manual_seed(0)
    model, tok = kvtool.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.kv.st"
        shutil.copy(Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.kv.st", path)
        prof = Profile.load(path, model=model)
    start = time.time()
    prof = calibrate(model, tok, "pca", profile=prof, options={"samples": 2, "seq_len": 512, "max_points": 2048})
    print(json.dumps({"calibrate_pca_seconds": round(time.time() - start, 1)}), flush=True)
    samples = nll_samples(tok, args.samples, args.context, args.continuation, seed=0)
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    for spec in specs:
        r = run_nll(model, samples, spec, prof, chunk=512, decode_steps=4)
        print(json.dumps(r.__dict__, default=str), flush=True)
    for spec in specs:
        if "rank=" in spec:
            print(json.dumps({"spec": spec, "ranks": layer_ranks(CompressedCache(model, prof, spec).lowrank)}))


if __name__ == "__main__":
    main()
