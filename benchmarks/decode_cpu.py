"""CPU decode speed: the full cache (transformers DynamicCache, sdpa) vs a kvtool policy, at several context lengths.

    python benchmarks/decode_cpu.py                               # 1k, 4k, 16k; the shipped 4x policy
    python benchmarks/decode_cpu.py --contexts 1024,4096 --steps 32 --rounds 5 --json

Same process, same model (the embedded SmolLM2-135M-Instruct, float32), same token ids (seeded random ids from the
vocabulary; decode speed does not depend on the text). For each context both caches are prefilled in chunks of 512
tokens, then timed in `rounds` rounds of `steps` greedy single-token decode steps each, alternating which cache goes
first, so machine load hits both alike; the reported tokens/s is the median over rounds, and the paired ratio the
median over rounds of policy/full within the same round (the fairer number on a shared machine). torch threads are fixed
(--threads). The full cache runs the model's own "sdpa" attention; the policy runs the "kvtool" attention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtool.cache import with_cache  # noqa: E402

POLICY = "heads=duo:0.5,k=4,v=4,krope=pre"
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.kv.st"


def decode(model, cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """`steps` greedy steps from token [1, 1]; returns (seconds, last token)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=token, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start, token


def run(contexts: list[int], steps: int, rounds: int, policy: str, threads: int, chunk: int) -> list[dict]:
    import kvtool
    from transformers import DynamicCache

    from kvtool.baselines import bytes16
    from kvtool.cache import CompressedCache, prefill

    torch.set_num_threads(threads)
    model, tok = kvtool.load_model()
    profile = kvtool.Profile.load(PROFILE, model=model)
    vocab = model.config.vocab_size
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, vocab, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        caches, tokens, prefill_s = {}, {}, {}
        for name in ("full", "policy"):
            if name == "full":
                model.set_attn_implementation("sdpa")
                cache = DynamicCache(config=model.config)
            else:
                cache = CompressedCache(model, profile, policy, backend="torch")
            t0 = time.perf_counter()
            logits = prefill(model, ids, cache, chunk=chunk)
            prefill_s[name] = time.perf_counter() - t0
            caches[name], tokens[name] = cache, logits.argmax(-1, keepdim=True)
        times = {"full": [], "policy": []}
        for r in range(rounds):
            for name in (("full", "policy") if r % 2 == 0 else ("policy", "full")):
                model.set_attn_implementation("sdpa" if name == "full" else "kvtool")
                sec, tokens[name] = decode(model, caches[name], tokens[name], steps)
                times[name].append(steps / sec)
        full_tps, pol_tps = statistics.median(times["full"]), statistics.median(times["policy"])
        paired = statistics.median(p / f for p, f in zip(times["policy"], times["full"]))   # same round, same load
        rows.append({"context": ctx, "full_tok_s": round(full_tps, 2), "policy_tok_s": round(pol_tps, 2),
                     "ratio": round(pol_tps / full_tps, 3), "paired_ratio": round(paired, 3),
                     "full_rounds": [round(x, 2) for x in times["full"]],
                     "policy_rounds": [round(x, 2) for x in times["policy"]],
                     "prefill_s": {k: round(v, 1) for k, v in prefill_s.items()},
                     "full_kv_mib_16bit": round(bytes16(t for layer in caches["full"].layers for t in (layer.keys, layer.values)) / 2 ** 20, 2),
                     "policy_kv_mib": round(caches["policy"].nbytes() / 2 ** 20, 2)})
        del caches
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    model.set_attn_implementation("sdpa")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policy", default=POLICY)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared machine, more threads than free cores make every "
                         "small op wait on its OpenMP team, which hurts the many small ops of a blocked read most)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run([int(c) for c in args.contexts.split(",")], args.steps, args.rounds, args.policy, args.threads,
               args.chunk)
    if args.json:
        print(json.dumps({"policy": args.policy, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
                          "rows": rows}, indent=1))
        return
    print(f"policy {args.policy}; torch threads {args.threads}; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'context':>8} {'full tok/s':>11} {'policy tok/s':>13} {'ratio':>6} {'paired ratio':>13} "
          f"{'full KV MiB (16-bit)':>21} {'policy KV MiB':>14}")
    for r in rows:
        print(f"{r['context']:>8} {r['full_tok_s']:>11.2f} {r['policy_tok_s']:>13.2f} {r['ratio']:>6.2f} "
              f"{r['paired_ratio']:>13.2f} {r['full_kv_mib_16bit']:>21.2f} {r['policy_kv_mib']:>14.2f}")


if __name__ == "__main__":
    main()
