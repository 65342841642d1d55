"""Is `kvtool bench --reuse-prefix` exact on the embedded model, and how much prefill does it skip? For each spec,
every passkey-chat sample is prefilled from scratch and again resumed from a saved state (kvtool.prefix_reuse), then
decoded greedily for a few steps; prints the largest |difference| of the logits over all steps (0 means exact), the
greedy tokens' agreement, and the prompt tokens run each way. Not a test (minutes on CPU).

    python benchmarks/prefix_reuse_check.py --lengths 1024,2048 --depths 3 --threads 2 \\
        --specs "full;select=snapkv++,budget=512;heads=razor:0.1"
"""

from __future__ import annotations

import argparse
import time

import torch

from kvtool.baselines import make_cache
from kvtool.cache import with_cache
from kvtool.cli_run import shipped_profile
from kvtool.evaluate import prompt_in, reuse_plan
from kvtool.models import load_model
from kvtool.profile import Profile
from kvtool.tasks import chat_passkey_samples, question_ids


@torch.inference_mode()
def run(model, tok, prof, spec, samples, query, reuse, steps=6, chunk=512):
    handle = make_cache(model, prof, spec)
    question = question_ids("passkey-chat", tok, query)
    plan = reuse_plan(tok, [s[0] for s in samples], query, chunk, question, reuse=reuse)
    out, t0 = [], time.perf_counter()
    for i, (prompt, _, _) in enumerate(samples):
        cache = handle.fresh()
        logits, cache = prompt_in(model, tok, prompt, cache, chunk, query, "cpu", question, reuse=plan, index=i)
        seq = [logits]
        for _ in range(steps - 1):
            token = seq[-1].argmax(-1, keepdim=True)
            seq.append(model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1])
        out.append(torch.stack(seq))
    run_tokens = sum(s[0].numel() for s in samples) - (plan.reused_tokens if plan else 0)
    return out, run_tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", type=int, default=3)
    ap.add_argument("--specs", default="full;select=snapkv++,budget=512;heads=razor:0.1")
    ap.add_argument("--query", default="inside", choices=["inside", "after"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from kvtool.evaluate import default_depths

    model, tok = load_model()
    prof = Profile.load(shipped_profile(None))
    samples = chat_passkey_samples(tok, [int(x) for x in args.lengths.split(",")], default_depths(args.depths))
    print(f"{len(samples)} passkey-chat samples, query {args.query}")
    for spec in [s.strip() for s in args.specs.split(";") if s.strip()]:
        fresh, n_fresh, t_fresh = run(model, tok, prof, spec, samples, args.query, reuse=False)
        again, n_again, t_again = run(model, tok, prof, spec, samples, args.query, reuse=True)
        diff = max(float((a - b).abs().max()) for a, b in zip(fresh, again))
        same = sum(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(fresh, again))
        print(f"{spec}: max |logit diff| {diff:g}; greedy tokens identical on {same}/{len(samples)} samples; "
              f"prompt tokens run {n_fresh} -> {n_again} ({1 - n_again / n_fresh:.0%} skipped); "
              f"{t_fresh:.0f} s -> {t_again:.0f} s")


if __name__ == "__main__":
    main()
