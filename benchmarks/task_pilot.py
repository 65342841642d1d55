"""Look at a kvtool.tasks generation task on the full cache: each sample's greedy continuation next to its answer, and
where it first goes wrong (for designing a task on pilot seeds; `kvtool bench --task` gives only hit or miss).
The same cache, prefill and greedy decoding as `kvtool bench`'s full cache (kvtool.baselines.make_cache("full"),
kvtool.cache.prefill in chunks of 512, kvtool.evaluate.greedy), one torch thread.

    python benchmarks/task_pilot.py copy-digits --seed 115 [--lengths 1024,2048,3072,4096] [--index 0,5,32]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--lengths", default="1024,2048,3072,4096")
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--text", default=None)
    ap.add_argument("--index", default=None, help="comma-separated sample indices (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from kvtool import tasks
    from kvtool.baselines import make_cache
    from kvtool.cache import prefill
    from kvtool.evaluate import Meter, default_depths, greedy
    from kvtool.models import load_model

    model, tok = load_model()
    task = tasks.get(args.task)
    if task.kind != "generate":
        raise SystemExit(f"Error: {args.task} is not a generation task")
    data = tasks.samples(args.task, tok, [int(n) for n in args.lengths.split(",")], default_depths(args.depths),
                         args.seed, args.text)
    picked = range(len(data)) if args.index is None else [int(i) for i in args.index.split(",")]
    meter = Meter(make_cache(model, None, "full"))
    hits = 0
    with torch.inference_mode():
        for i in picked:
            prompt, answer_ids, answer = data[i]
            cache = meter.handle.fresh()
            logits = prefill(model, prompt.view(1, -1), cache, 512)                     # [1, V]
            got = greedy(model, cache, logits, len(answer_ids) + tasks._SPARE, meter)
            ok = tasks.correct(task, got, list(answer_ids), answer, tok)
            want = list(answer_ids)
            first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
            hits += ok
            print(f"{i} {len(prompt)} {'OK  ' if ok else 'MISS'} {tok.decode(prompt[-8:])!r} -> {tok.decode(got)!r} "
                  f"| want {answer!r} | first wrong token {first}", flush=True)
    print(f"{hits}/{len(picked)} correct")


if __name__ == "__main__":
    main()
