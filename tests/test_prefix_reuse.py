"""Prefix reuse across samples (`kvtool bench --reuse-prefix`, kvtool/prefix_reuse.py).

- the plan: each prompt resumes from the largest chunk boundary below its length that an earlier prompt shares;
  copies are saved only where a later prompt resumes and dropped after their last use;
- exactness, every store: a prompt resumed from a saved state gives exactly the logits (torch.equal, CPU float32)
  at every decode step, and the same bytes, as the same prompt prefilled from scratch, with the question inside
  and after the compression (one policy per store of kvtool.stores.STORES, plus the full DynamicCache and a model
  with its own sliding-window layers);
- `kvtool bench --reuse-prefix` gives the same hits and bytes per spec as without it (alone and sharing a prefill),
  runs fewer prefill tokens, and keeps the --rows setup.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from conftest import VOCAB, tiny_model
from test_lowrank_store import calibrated  # noqa: F401  (fixture: a tiny model and a profile with a pca section)
from test_run_cli import tiny_with_profile  # noqa: F401  (fixture: a tiny model saved with a profile)
from test_shared_store import _pod_profile
from kvtool.cache import CompressedCache, prefill, with_cache
from kvtool.evaluate import prompt_in
from kvtool.prefix_reuse import PrefixReuse, common_prefix
from kvtool.stores import STORES

CHUNK = 16
QUESTION = [5, 9, 2, 7, 3]


def _prompts(seed=0, question=QUESTION):
    """Prompts built like the pass-key task's: one trunk, a needle cut in at a depth, the question at the end."""
    g = torch.Generator().manual_seed(seed)
    trunk = torch.randint(10, VOCAB, (140,), generator=g)
    needle = torch.tensor([1, 2, 3, 4, 1, 2])
    q = torch.tensor(question)
    out = []
    for length, cut in [(90, 20), (90, 60), (120, 40), (120, 100), (90, 60), (75, 70)]:
        body = torch.cat([trunk[:cut], needle, trunk[cut:length - len(needle) - len(q)]])
        out.append(torch.cat([body, q]))
    return out


def test_the_plan_resumes_from_the_longest_shared_chunk_boundary():
    ps = _prompts()
    assert common_prefix(ps[0], ps[1]) == 20 and common_prefix(ps[1], ps[3]) == 60
    assert common_prefix(ps[1], ps[4]) == 90                                     # the same prompt twice
    plan = PrefixReuse(ps, CHUNK)
    # 0: nothing earlier; 1: shares 20 with 0 -> 16; 2: 40 with 1 -> 32; 3: 60 with 1 -> 48; 4: all 90 of 1, but one
    # token must be left to run -> 80; 5: 70 with 3 -> 64
    assert plan.start == [0, 16, 32, 48, 80, 64]
    assert plan.planned_reuse() == 16 + 32 + 48 + 80 + 64
    assert PrefixReuse(ps, 64).start == [0, 0, 0, 0, 64, 64]
    assert PrefixReuse([torch.arange(30), torch.arange(30) + 1], CHUNK).start == [0, 0]     # nothing shared


def test_saved_states_are_kept_only_until_their_last_use():
    model = tiny_model("gqa")
    ps = _prompts()
    plan = PrefixReuse(ps, CHUNK)
    held = []
    with torch.inference_mode():
        for i, p in enumerate(ps):
            _, cache = plan.prefill(model, i, p.view(1, -1), DynamicCache(config=model.config))
            held.append(sorted(b for b, _ in plan.states))
    assert held[-1] == [] and not plan.last_use                                  # everything freed at the end
    assert 48 in held[1] and 80 in held[1]                                       # saved by prompt 1 for 3 and 4
    assert plan.reused_tokens == plan.planned_reuse()
    with pytest.raises(ValueError, match="not the one"):
        PrefixReuse(ps, CHUNK).prefill(model, 0, ps[1].view(1, -1), DynamicCache(config=model.config))


POLICIES = {     # store -> a policy that uses it (with the profile the fixture gives: "trace", "pca" or "pod")
    "quantized": ("heads=random:0.5:1,k=4,v=4,sink=4,recent=16,buffer=8", "trace"),
    "window": ("heads=none,sink=4,recent=20", "trace"),
    "qwindow": ("heads=random:0.5:1,sink=4,recent=48,wk=4,wv=4,buffer=8", "trace"),
    "snapkv": ("select=snapkv++,budget=40,obs=8,kernel=7,read=16,page=8", "trace"),
    "h2o": ("select=h2o,budget=40", "trace"),
    "lowrank": ("heads=all,krank=6,vrank=6,sink=4,buffer=8", "pca"),
    "shared": ("heads=all,pod=on,podrecent=16", "pod"),
    "sliding": ("heads=all", "sliding"),
}
EXTRA = ["full", "heads=all", "heads=random:0.5:1,select=snapkv++,budget=40,sink=4,recent=16",
         "select=snapkv,budget=32,obs=4,kernel=5"]


def test_every_registered_store_is_in_the_matrix():
    assert set(POLICIES) == set(STORES)


def _model_and_profile(kind, calibrated):        # noqa: F811
    if kind == "pca":
        model, _, prof, _ = calibrated
        return model, prof
    if kind == "pod":
        model = tiny_model("gqa")
        return model, _pod_profile(model, [0, 0, 2])
    if kind == "sliding":
        return tiny_model("sliding"), None
    model, prof, _, _ = calibrated
    return model, calibrated[3]                                                  # the bare trace (quant ranges)


def _run(model, profile, spec, prompts, query, reuse):
    """Every prompt: prefill (from a saved state with `reuse`), then 4 greedy steps. → [(logits [5, 1, V], bytes)]"""
    plan = PrefixReuse([p[:-len(QUESTION)] if query == "after" else p for p in prompts], CHUNK) if reuse else None
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            cache = DynamicCache(config=model.config) if spec == "full" else CompressedCache(model, profile, spec)
            if spec == "full":
                model.set_attn_implementation("sdpa")
            logits, cache = prompt_in(model, None, p, cache, CHUNK, query, "cpu", QUESTION, reuse=plan, index=i)
            steps = [logits]
            for _ in range(4):
                tok = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(input_ids=tok, **with_cache(model, cache), use_cache=True).logits[:, -1])
            nbytes = cache.nbytes() if hasattr(cache, "nbytes") else cache.get_seq_length()
            out.append((torch.stack(steps), nbytes, cache.get_seq_length()))
    if plan is not None:
        assert plan.reused_tokens > 0
    return out


CASES = [(name, spec, kind) for name, (spec, kind) in POLICIES.items()] + [(s, s, "trace") for s in EXTRA]


@pytest.mark.parametrize("query", ["inside", "after"])
@pytest.mark.parametrize("name,spec,kind", CASES, ids=[c[0] for c in CASES])
def test_a_resumed_prefill_is_exactly_a_fresh_one(name, spec, kind, query, calibrated):      # noqa: F811
    model, profile = _model_and_profile(kind, calibrated)
    prompts = _prompts()
    fresh = _run(model, profile, spec, prompts, query, reuse=False)
    resumed = _run(model, profile, spec, prompts, query, reuse=True)
    for i, ((a, bytes_a, seen_a), (b, bytes_b, seen_b)) in enumerate(zip(fresh, resumed)):
        assert torch.equal(a, b), (name, query, i, (a - b).abs().max())
        assert (bytes_a, seen_a) == (bytes_b, seen_b), (name, query, i)
    assert not torch.equal(fresh[0][0], fresh[1][0])                          # the prompts differ: the check could fail


def test_a_copy_cut_at_the_wrong_boundary_would_be_caught(calibrated):   # noqa: F811
    """The exactness test can fail: resuming one token late (not at a chunk boundary) changes the numbers."""
    model, profile = _model_and_profile("trace", calibrated)
    spec = "select=snapkv++,budget=40,obs=8,kernel=7"
    p = _prompts()[3]
    with torch.inference_mode():
        a = prefill(model, p.view(1, -1), CompressedCache(model, profile, spec), CHUNK)
        cache = CompressedCache(model, profile, spec)
        prefill(model, p[:49].view(1, -1), cache, CHUNK, finish=False)
        b = prefill(model, p[49:].view(1, -1), cache, CHUNK)
    assert not torch.equal(a, b)


def test_bench_reuse_prefix_gives_the_same_rows(capsys, tiny_with_profile, tmp_path):   # noqa: F811
    """passkey (question after) and passkey-chat (inside), alone and in a shared-prefill group: the same hits and bytes as
    without --reuse-prefix, fewer tokens run (reused_tokens), and a --rows file made with it is read back by the same
    command without it (the setup does not name the flag)."""
    from test_cli import run

    model_dir, prof = tiny_with_profile
    specs = "select=snapkv++,budget=40,obs=8,kernel=7;select=snapkv,budget=32,obs=4,kernel=5;heads=0.5,sink=4,recent=16"
    for n, (task, length, query) in enumerate([("passkey", "96,128", "after"), ("passkey-chat", "160", "inside")]):
        args = ["bench", model_dir, "--profile", prof, "--task", task, "--lengths", length, "--depths", "3",
                "--chunk", "16", "--baselines", "none", "--policies", specs, "--query", query, "--json"]
        code, out, err = run(capsys, *args, "--share-prefill")
        assert code == 0, err
        plain = json.loads(out)
        rows = tmp_path / f"{task}-{query}.jsonl"
        code, out, err = run(capsys, *args, "--share-prefill", "--reuse-prefix", "--rows", rows)
        assert code == 0, err
        reused = json.loads(out)
        assert [r.get("shared_prefill", False) for r in reused] == [False, True, True, False]
        for a, b in zip(plain, reused):
            assert a["cache"] == b["cache"]
            assert (a["hits"], a["kv_MiB"], a.get("read_MiB")) == (b["hits"], b["kv_MiB"], b.get("read_MiB")), a["cache"]
            assert "reused_tokens" not in a and b["reused_tokens"] > 0, b["cache"]
        if n == 0:
            code, out, err = run(capsys, *args, "--share-prefill", "--rows", rows)
            assert code == 0, err
            assert json.loads(out) == reused                                     # read back, not run again
