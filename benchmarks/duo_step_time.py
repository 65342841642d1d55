"""Seconds per duo step on the embedded model (issue 14, point 2): the paper's student (`--student all`: teacher,
gated student and backward over the whole sample) against the tail student (`--student tail`: one prefill of the
context, the supervised span twice), with a plain no-grad decoder forward of the same length for scale. `--reused`
also times a tail step over a context already prefilled (what each step after the first on a sample costs with
`--reuse K`).

    python benchmarks/duo_step_time.py --threads 2 --lengths 1024,4096 --student all,tail --repeats 2 [--reused]

Samples come from the `cpu-deploy` preset's task generators at each length (training seeds, as in training).
Minutes on a CPU; not run by any test.
"""

from __future__ import annotations

import argparse
import time

import torch

from calibrate.duo import Duo, _duo_attention, _DuoState
from kvtool.models import load_model
from kvtool.trace import Dims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--student", default="all,tail")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reused", action="store_true", help="also time a tail step over a reused context")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    dims = Dims.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    print("| length | what | seconds per step (each repeat) |\n|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        if args.reused:
            reused_step(model, tok, dims, length, args.repeats)
        ids = torch.randint(100, 20_000, (1, length))
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model.get_decoder()(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - t0)
        print(f"| {length} | plain no-grad decoder forward | {', '.join(f'{t:.1f}' for t in times)} |", flush=True)
        for student in args.student.split(","):
            duo = Duo.from_preset("cpu-deploy", min_len=length, max_len=length, lengths=1, student=student)
            gates = torch.ones(dims.layers, dims.kv_heads, requires_grad=True)
            state = _DuoState(gates, dims, duo.train_sink, duo.train_recent, duo.full_branch)
            times = []
            with _duo_attention(model, state):
                for step in range(args.repeats):
                    sample = duo.sample(tok, [length], step)
                    t0 = time.perf_counter()
                    loss, reg, _ = duo._step(model, state, sample)
                    (loss + duo.l1_weight * reg).backward()
                    times.append(time.perf_counter() - t0)
            print(f"| {length} | duo step, student {student} | {', '.join(f'{t:.1f}' for t in times)} |", flush=True)


def reused_step(model, tok, dims, length: int, repeats: int) -> None:
    """A tail step over a context prefilled once (`--reuse`): the first step (prefill + span) and the next ones."""
    duo = Duo.from_preset("cpu-deploy", min_len=length, max_len=length, lengths=1, reuse=repeats + 1)
    gates = torch.ones(dims.layers, dims.kv_heads, requires_grad=True)
    state = _DuoState(gates, dims, duo.train_sink, duo.train_recent, duo.full_branch)
    sample = duo.sample(tok, [length], 0)
    times, context = [], None
    with _duo_attention(model, state):
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            loss, reg, context = duo._step(model, state, sample, context)
            (loss + duo.l1_weight * reg).backward()
            times.append(time.perf_counter() - t0)
    print(f"| {length} | tail step with --reuse: first (prefill), then reused | {times[0]:.1f}, then "
          f"{', '.join(f'{t:.1f}' for t in times[1:])} |", flush=True)


if __name__ == "__main__":
    main()
