"""A shared prefill (`kvtool bench --share-prefill`): `CompressedCache.adopt_prefill` and the bench's groups.

- a cache that adopts another's unfinished prefill (prefill(..., finish=False)) and then selects gives exactly the
  logits (torch.equal, CPU float32) of a cache that ran the prefill itself, at every decode step, for SnapKV++ and
  SnapKV with budgets below the prompt, stage 2 (read / page), a 4-bit body, other obs / kernel / pool, with the
  question inside the prompt and after the compression;
- what cannot be shared exactly is refused in one line (and `share_prefill_refusal` says so from the policy alone);
- `kvtool bench --share-prefill` gives the same per-sample hits / NLL per spec as without it, marks the shared rows,
  runs the others unshared, and keeps its --rows setup unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from test_run_cli import tiny_with_profile  # noqa: F401  (the fixture: a tiny model saved with a profile)
from kvtool.cache import CompressedCache, prefill, share_prefill_refusal, with_cache
from kvtool.errors import KvtoolError
from kvtool.policy import Policy

QUALIFYING = [
    "select=snapkv++,budget=40,obs=8,kernel=7",
    "select=snapkv,budget=40,obs=4,kernel=5",
    "select=snapkv++,budget=0.3,obs=16,kernel=3,pool=avg",
    "select=snapkv++,budget=48,obs=8,kernel=7,read=16,page=8",
    "select=snapkv,budget=48,obs=12,kernel=7,read=0.5,page=4,rdims=8",
    "select=snapkv++,budget=500,obs=8,kernel=7,read=16,page=8",          # the budget keeps every token
]


def _decode(model, cache, logits, question, steps=5, chunk=16):
    """The question (if any) through the cache, then greedy steps; every step's logits [steps+1, 1, V]."""
    with torch.inference_mode():
        if question is not None:
            logits = prefill(model, question, cache, chunk)
        out = [logits]
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=tok, **with_cache(model, cache), use_cache=True).logits[:, -1]
            out.append(logits)
    return torch.stack(out)


def _alone(model, profile, policy, context, question):
    cache = CompressedCache(model, profile, policy)
    with torch.inference_mode():
        logits = prefill(model, context, cache, 16)
    return _decode(model, cache, logits, question), cache


def _forked(model, profile, policies, context, question, source_policy=None):
    """One prefill into a source cache (the widest obs of the group recorded), then each policy adopts it."""
    caches = [CompressedCache(model, profile, p) for p in policies]
    source = CompressedCache(model, profile, source_policy or policies[0])
    source.widen_obs(caches)
    with torch.inference_mode():
        logits = prefill(model, context, source, 16, finish=False)
    out = []
    for cache in caches:
        cache.adopt_prefill(source)
        cache.finish_prefill()
        out.append((_decode(model, cache, logits, question), cache))
    return out


def _ids(n, seed):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("question", [False, True], ids=["inside", "after"])
def test_a_forked_cache_decodes_exactly_as_one_that_prefilled_alone(question):
    model = tiny_model("gqa")
    policies = [p + ",dtype=fp32" for p in QUALIFYING]
    context, q = _ids(90, 1), (_ids(7, 2) if question else None)
    forked = _forked(model, None, policies, context, q)
    for policy, (got, cache) in zip(policies, forked):
        ref, alone = _alone(model, None, policy, context, q)
        assert torch.equal(got, ref), policy
        assert cache.nbytes() == alone.nbytes() and cache.read_nbytes() == alone.read_nbytes(), policy
        for a, b in zip(cache.layers, alone.layers):
            sa, sb = a.stores[0], b.stores[0]
            assert torch.equal(sa.pos, sb.pos) and torch.equal(sa.k, sb.k), policy
    # the selection did drop tokens (the check above compares selections, not two full caches)
    assert min(len(c.layers[0].stores[0]) for _, c in forked[:3]) < 90


def test_fork_in_16_bit_storage_and_with_a_4bit_body(tiny_with_profile):
    """The default 16-bit storage (float16 on a float32 model) and a quantized body (k=4, v=4) made at the selection."""
    from kvtool.models import load_model
    from kvtool.profile import Profile

    model_dir, prof = tiny_with_profile
    model, _ = load_model(str(model_dir))
    p = Profile.load(prof)
    policies = ["select=snapkv++,budget=64,obs=8,kernel=7,sink=4,buffer=8,k=4,v=4",
                "select=snapkv++,budget=64,obs=16,kernel=5",
                "select=snapkv,budget=48,obs=8,kernel=7,read=16,page=8"]
    context, q = _ids(160, 5), _ids(6, 6)
    for question in (None, q):
        for policy, (got, cache) in zip(policies, _forked(model, p, policies, context, question)):
            ref, _ = _alone(model, p, policy, context, question)
            assert torch.equal(got, ref), policy
    body = _forked(model, p, policies[:1], context, None)[0][1].layers[0].stores[0].body
    assert type(body).__name__ == "QuantizedStore" and body.n_body > 0


@pytest.mark.parametrize("policy, msg", [
    ("heads=random:0.5,select=snapkv++,budget=40", "streaming heads"),
    ("select=h2o,budget=40", "evicts as tokens arrive"),
    ("heads=all", "no token selection"),
    ("heads=none,sink=4,recent=16", "no token selection"),
])
def test_what_cannot_be_shared_is_refused_in_one_line(policy, msg):
    model = tiny_model("gqa")
    assert msg in share_prefill_refusal(Policy.parse(policy))
    source = CompressedCache(model, None, QUALIFYING[0])
    with torch.inference_mode():
        prefill(model, _ids(40, 3), source, 16, finish=False)
    other = CompressedCache(model, None, policy)
    with pytest.raises(KvtoolError, match=msg) as exc:
        other.adopt_prefill(source)
    assert "\n" not in str(exc.value)
    assert other.get_seq_length() == 0                                  # nothing adopted
    # and the other way round: a qualifying cache refuses a source that is not
    with torch.inference_mode():
        prefill(model, _ids(40, 3), other, 16, finish=False)
    with pytest.raises(KvtoolError, match=msg):
        CompressedCache(model, None, QUALIFYING[0]).adopt_prefill(other)


def test_refusals_of_an_inexact_adoption():
    model = tiny_model("gqa")
    wide, narrow = "select=snapkv++,budget=40,obs=16", "select=snapkv++,budget=40,obs=4"
    source = CompressedCache(model, None, narrow)
    with torch.inference_mode():
        prefill(model, _ids(40, 3), source, 16, finish=False)
    with pytest.raises(KvtoolError, match="needs 16 .*widen_obs"):
        CompressedCache(model, None, wide).adopt_prefill(source)
    with pytest.raises(KvtoolError, match="stored as torch.float16: this cache stores torch.float32"):
        CompressedCache(model, None, narrow + ",dtype=fp32").adopt_prefill(source)
    with pytest.raises(KvtoolError, match="another model structure"):
        CompressedCache(tiny_model("mha"), None, narrow).adopt_prefill(source)
    used = CompressedCache(model, None, narrow)
    used.adopt_prefill(source)
    with pytest.raises(KvtoolError, match="has seen tokens"):
        used.adopt_prefill(source)
    source.finish_prefill()                                             # the source selected: too late
    with pytest.raises(KvtoolError, match="already selected"):
        CompressedCache(model, None, narrow).adopt_prefill(source)
    sliding = tiny_model("sliding")
    assert "not one SnapKV store" in CompressedCache(sliding, None, narrow).share_refusal()


def test_share_plan_groups_what_qualifies():
    from kvtool.shared_prefill import share_plan

    model = tiny_model("gqa")
    specs = ["full", "select=snapkv++,budget=8", "select=h2o,budget=8", "select=snapkv,budget=8,obs=4",
             "select=snapkv++,budget=8,dtype=fp32", "heads=random:0.5,select=snapkv++,budget=8", "streaming:4:8",
             "select=snapkv++,budget=16,read=8"]
    assert share_plan(model, None, specs) == [[0], [1, 3, 7], [2], [4], [5], [6]]
    assert share_plan(tiny_model("sliding"), None, specs[1:2] + specs[3:4]) == [[0], [1]]   # sliding layers


SHARED = ["select=snapkv++,budget=40,obs=8,kernel=7", "select=snapkv,budget=32,obs=4,kernel=5",
          "select=snapkv++,budget=40,obs=8,kernel=7,read=16,page=8", "select=snapkv++,budget=48,k=4,v=4,sink=4,buffer=8"]
UNSHARED = ["full", "select=h2o,budget=40", "heads=0.5,select=snapkv++,budget=40,sink=4,recent=16"]


def _bench(model, tok, prof, task, samples, share, query="inside", **kw):
    from kvtool.sweep import run_specs as _run_specs

    return _run_specs(model, tok, prof, task, samples, UNSHARED[:1] + SHARED[:2] + UNSHARED[1:] + SHARED[2:], 16,
                      "auto", decode_steps=2, query=query, share=share, **kw)


def _same(a, b):
    assert a.spec == b.spec
    assert (a.hits, a.correct, a.nll, a.sample_nll) == (b.hits, b.correct, b.nll, b.sample_nll), a.spec
    assert (a.kv_bytes, a.full16_bytes, a.read_bytes, a.query) == (b.kv_bytes, b.full16_bytes, b.read_bytes, b.query)


def test_bench_share_prefill_gives_the_unshared_results(tiny_with_profile):
    """passkey (question inside and after), nll, a generation task and passkey-chat with its question after: the same per-sample hits / NLL, bytes held
    and read, with and without sharing; the shared rows say so, the others run alone."""
    from kvtool.sweep import samples_for as _samples
    from kvtool.models import load_model
    from kvtool.profile import Profile

    model_dir, prof = tiny_with_profile
    model, tok = load_model(str(model_dir))
    p = Profile.load(prof)
    runs = [("passkey", "inside"), ("passkey", "after"), ("nll", "inside"), ("copy", "inside"),
            ("passkey-chat", "after")]
    for task, query in runs:
        length = 160 if task == "passkey-chat" else 96                 # the chat template's turns take ~60 tokens
        data = _samples(task, tok, [length], 2, 2, 72, 12, 0, {"nll": "pydoc", "copy": "filler"}.get(task, "filler"))
        alone = _bench(model, tok, p, task, data, False, query)
        shared = _bench(model, tok, p, task, data, True, query)
        for a, b in zip(alone, shared):
            _same(a, b)
            assert not a.shared_prefill and b.shared_prefill == (a.spec in SHARED), a.spec
            assert b.prefill_tokens_per_s > 0 and b.seconds > 0
        assert len({r.kv_bytes for r in shared}) > 2                  # the caches differ: the check could fail
        if task == "nll":
            assert len({tuple(r.sample_nll) for r in shared}) > 2


def test_bench_rows_setup_is_the_same_with_and_without_sharing(capsys, tiny_with_profile, tmp_path):
    """--rows: a run with --share-prefill appends each row once (marked shared); the same command without the flag
    reads every row back instead of running (the setup does not name the flag), and prints the same results."""
    from test_cli import run

    model_dir, prof = tiny_with_profile
    rows = tmp_path / "rows.jsonl"
    args = ["bench", model_dir, "--profile", prof, "--task", "nll", "--samples", "2", "--context", "64",
            "--continuation", "8", "--decode-steps", "1", "--chunk", "16", "--baselines", "none", "--policies",
            ";".join(SHARED[:2] + UNSHARED[1:2]), "--rows", rows, "--json"]
    code, out, err = run(capsys, *args, "--share-prefill")
    assert code == 0, err
    first = json.loads(out)
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [x["result"]["spec"] for x in lines] == ["full"] + SHARED[:2] + UNSHARED[1:2] or \
        sorted(x["result"]["spec"] for x in lines) == sorted(["full"] + SHARED[:2] + UNSHARED[1:2])
    assert [x["result"]["shared_prefill"] for x in lines if x["result"]["spec"] in SHARED[:2]] == [True, True]
    assert all("share" not in k for k in lines[0]["setup"])
    assert [r.get("shared_prefill", False) for r in first] == [False, True, True, False]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert len(rows.read_text().splitlines()) == len(lines)            # nothing ran again
    assert json.loads(out) == first
