"""`kvtool bench --share-prefill`: one prefill per sample for a group of caches whose state is the same until the
prompt ends, then each cache selects and decodes on its own.

A cache qualifies when `kvtool.cache.share_prefill_refusal` finds nothing against its policy (`select=snapkv++` or
`select=snapkv` with `heads=all`: one SnapKV store per layer holding every prompt token in 16 bits until
`finish_prefill`) and the built cache is one SnapKV store per layer (no sliding-window layers of the model's own,
`CompressedCache.share_refusal`); qualifying caches with the same storage dtype (`share_key`) form a group. Per
sample the group's prompt (passkey / passkey-chat `--query after`: its context) is prefilled once into a source cache that records
the widest observation window of the group (`widen_obs`) and never selects (`prefill(..., finish=False)`); every
cache of the group then adopts it (`CompressedCache.adopt_prefill`, a copy), selects with its own policy
(`finish_prefill`) and goes on exactly as `run_passkey` / `run_nll` / `kvtool.tasks.run_generate` do: the question
after compression, greedy decoding, the teacher-forced continuation. The results equal the unshared runs' exactly
(tests/test_share_prefill.py); the rows say `shared_prefill`.

Time: each row of a group counts the shared prefill's time in full (in its prefill tok/s and its seconds), plus its
own adoption (the copy), selection and, with `--query after`, its question; so a row's prefill speed is what one
cache alone would have measured, up to the noise of one measurement shared by the group, and the group's rows'
seconds add up to more than the wall time they took.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError

BASELINE_PREFIXES = ("quanto:", "streaming:", "press:")


def share_plan(model, profile, specs: list[str], backend: str = "auto") -> list[list[int]]:
    """The specs (by index) as run groups, in the order of each group's first spec: a group of two or more shares a
    prefill, a group of one runs alone (baselines, the full cache, policies that do not qualify, a qualifying policy
    with no partner)."""
    from kvtool.cache import CompressedCache, _profile_method, share_prefill_refusal
    from kvtool.policy import Policy

    keys: list = []
    for spec in specs:
        key = None
        s = spec.strip()
        if s != "full" and not s.startswith(BASELINE_PREFIXES):
            if share_prefill_refusal(Policy.parse(s, _profile_method(profile))) is None:
                cache = CompressedCache(model, profile, s, backend=backend)
                if cache.share_refusal() is None:
                    key = cache.share_key()
        keys.append(key)
    groups: list[list[int]] = []
    placed: dict = {}
    for i, key in enumerate(keys):
        if key is not None and key in placed:
            groups[placed[key]].append(i)
        else:
            if key is not None:
                placed[key] = len(groups)
            groups.append([i])
    return groups


@torch.inference_mode()
def run_group(model, tokenizer, task: str, samples, specs: list[str], profile=None, chunk: int = 512,
              backend: str = "auto", query: str = "inside", decode_steps: int = 16, reuse: bool = False) -> list:
    """Every spec of a group (share_plan) on the same samples, sample by sample, from one shared prefill each; a
    TaskResult per spec, as the unshared run would give (plus `shared_prefill`, and times as the module docstring
    says). `reuse`: the shared prefill resumes from an earlier sample's saved state of the same start
    (kvtool.prefix_reuse)."""
    from kvtool.baselines import make_cache
    from kvtool.cache import CompressedCache, _profile_method, prefill
    from kvtool.evaluate import QUERIES, Meter, Timer, _device, greedy, nll_tail, passkey_steps, prefilled_part
    from kvtool.prefix_reuse import PrefixReuse
    from kvtool.policy import Policy

    if task == "passkey":
        kind = "passkey"
        if query not in QUERIES:
            raise KvtoolError(f"unknown query regime {query!r} (inside or after)")
    elif task == "nll":
        kind = "nll"
    else:
        from kvtool.tasks import _SPARE, correct, get, question_ids

        kind = get(task).kind
    asked = question_ids(task, tokenizer, query) if kind == "generate" else None      # --query after: held back
    if len(specs) < 2:
        raise KvtoolError("a shared prefill needs a group of at least two caches")
    meters = [Meter(make_cache(model, profile, spec, backend)) for spec in specs]
    caches = [m.handle.fresh() for m in meters]
    for spec, cache in zip(specs, caches):
        reason = cache.share_refusal() if isinstance(cache, CompressedCache) else "not a kvtool policy"
        if reason:
            raise KvtoolError(f"{spec} cannot share a prefill: {reason}")
    first = Policy.parse(specs[0].strip(), _profile_method(profile))
    source = CompressedCache(model, profile, first.replace(read=None, k=16, v=16), backend=backend)
    source.widen_obs(caches)                                  # every cache's observation window is a suffix of it
    dev = _device(model)
    own = [Timer() for _ in specs]                            # each spec's time, the shared prefill's added
    hits: list[list[bool]] = [[] for _ in specs]
    nll = [[0.0, 0] for _ in specs]                           # summed cross-entropy, tokens
    per: list[list[float]] = [[] for _ in specs]
    regime = query if kind in ("passkey", "generate") else "inside"     # NLL has no question
    firsts = [prefilled_part(tokenizer, s[0], regime, asked) for s in samples]   # (prefilled first, question | None)
    plan = PrefixReuse([p for p, _ in firsts], chunk) if reuse else None
    for n_sample, (sample, (prompt, question)) in enumerate(zip(samples, firsts)):
        source.reset()
        with Timer() as shared:
            if plan is None:
                last = prefill(model, prompt.view(1, -1).to(dev), source, chunk, finish=False)   # [1, V]
                prefilled = source
            else:
                last, prefilled = plan.prefill(model, n_sample, prompt.view(1, -1).to(dev), source, finish=False)
        for i, m in enumerate(meters):
            with own[i]:
                cache = m.handle.fresh()
                with m.pre:
                    cache.adopt_prefill(prefilled)
                    cache.finish_prefill()                    # this spec's own selection
                    logits = last
                    if question is not None:
                        logits = prefill(model, question.view(1, -1).to(dev), cache, chunk)
                m.pre.seconds += shared.seconds
                m.n_pre += sample[0].numel() - (plan.last_reused if plan else 0)
                if kind == "passkey":
                    got = greedy(model, cache, logits, passkey_steps(tokenizer, sample[1]), m)
                    hits[i].append(sample[1] in tokenizer.decode(got))
                elif kind == "generate":
                    _, answer_ids, answer = sample
                    got = greedy(model, cache, logits, len(answer_ids) + _SPARE, m)
                    hits[i].append(correct(get(task), got, answer_ids, answer, tokenizer))
                else:
                    cont = sample[1].to(dev)
                    one = nll_tail(model, cache, logits, cont, decode_steps, m)
                    nll[i][0] += one
                    nll[i][1] += cont.numel()
                    per[i].append(one / max(cont.numel(), 1))
                if kind != "nll":
                    m.held(cache)
                    m.step_read(cache)
            own[i].seconds += shared.seconds
        source.reset()                                        # free the shared prompt before the next sample
        prefilled = None
    out = []
    n = len(samples)
    for i, (spec, m) in enumerate(zip(specs, meters)):
        if kind == "nll":
            r = m.result(spec, task, n, nll=nll[i][0] / max(nll[i][1], 1), sample_nll=per[i])
        else:
            r = m.result(spec, task, n, correct=sum(hits[i]), hits=hits[i],
                         query=None if query == "inside" else query)
        r.seconds, r.shared_prefill = own[i].seconds, True
        r.reused_tokens = plan.reused_tokens if plan else 0
        out.append(r)
    return out
