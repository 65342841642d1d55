"""Token selection and sparse decode (issue 12): SnapKV++ / SnapKV (kvtool/stores/snapkv.py), H2O
(kvtool/stores/h2o.py), RocketKV stage 2 (kvtool/stores/tokens.py).

- SnapKV++ selects once per KV head (every query head of a group reads the same tokens); plain SnapKV per query head
  (the test shows its heads of one group do differ, so the first check can fail);
- a planted token that every observation query attends to is always kept (SnapKV++, SnapKV, H2O);
- with a budget ≥ the context the cache reproduces the full cache (logits, greedy tokens) on a tiny model;
- a page's min/max upper bound is ≥ every true score of its keys; stage 2 reading every page equals the dense read,
  and reading fewer pages reads fewer bytes;
- a chunked prefill selects exactly what one whole-prompt forward selects; model.generate's path (no finish_prefill)
  selects at the first decode step; H2O holds at most its budget after every append.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from test_run_cli import tiny_with_profile  # noqa: F401  (the fixture: a tiny model saved with a profile)
from kvtool.cache import CompressedCache, prefill
from kvtool.errors import KvtoolError
from kvtool.stores.h2o import H2OStore
from kvtool.stores.snapkv import SnapKVStore
from kvtool.stores.tokens import page_upper_bound

B, H, G, D, T = 1, 2, 4, 16, 64


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * G, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
            torch.randn(B, H, T, D, generator=g))


def _drive(store, q, k, v, chunks, finish=True):
    """Drive a store as kvtool's prefill does (finish=True: no selection before finish_prefill), or as a bare
    forward loop (model.generate on a fresh cache)."""
    if finish and hasattr(store, "lazy"):
        store.lazy = False
    start = 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        store.attend(q[:, :, start:start + n], pos, 0.25, new=(k[:, :, start:start + n], v[:, :, start:start + n]))
        store.append(k[:, :, start:start + n], v[:, :, start:start + n], pos)
        start += n
    if finish and hasattr(store, "finish_prefill"):
        store.finish_prefill()
    return store


def test_snapkv_plus_one_selection_per_kv_group_and_plain_per_query_head():
    q, k, v = _qkv(1)
    plus = _drive(SnapKVStore(20, torch.float32, obs=8, kernel=3), q, k, v, [T])
    plain = _drive(SnapKVStore(20, torch.float32, obs=8, kernel=3, group_select=False), q, k, v, [T])
    assert plus.pos.shape == (B, H, 20) and plus.k.shape == (B, H, 20, D)         # one token set per KV head
    assert plain.pos.shape == (B, H * G, 20)                                     # one per query head: G copies
    # the query heads of a group read the same keys under SnapKV++: their attention over the store equals attention
    # over the KV head's kept tokens (one set), while plain SnapKV's heads of a group chose differently
    assert any(not torch.equal(plain.pos[0, h * G], plain.pos[0, h * G + j]) for h in range(H) for j in range(1, G))
    assert plain.nbytes() > (G - 1) * plus.nbytes() - 1
    # and SnapKV++'s set is the top of the pooled votes summed over the group
    from kvtool.select import pooled_votes, window_votes

    votes = window_votes(q[:, :, T - 8:], k, torch.arange(T - 8, T), torch.arange(T), 0.25)
    score = pooled_votes(votes[..., :T - 8], 3, "max").sum(2)
    want = score.topk(12, -1).indices.sort(-1).values
    assert torch.equal(plus.pos[..., :12].long(), want)
    assert torch.equal(plus.pos[..., 12:].long(), torch.arange(T - 8, T).expand(B, H, 8))


@pytest.mark.parametrize("make", [lambda: SnapKVStore(10, torch.float32, obs=4, kernel=5),
                                  lambda: SnapKVStore(5, torch.float32, obs=4, kernel=1, pool="avg"),
                                  lambda: SnapKVStore(0.2, torch.float32, obs=4, kernel=7, group_select=False),
                                  lambda: H2OStore(10, torch.float32)], ids=["snapkv++", "snapkv++-tight", "snapkv", "h2o"])
@pytest.mark.parametrize("planted", [3, 30, 50])
def test_planted_high_attention_token_is_kept(make, planted):
    q, k, v = _qkv(planted)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(99)), dim=0)
    q, k = q.clone(), k.clone()
    q[:, :, planted:] += 3.0 * u                          # every later query looks along u ...
    k[:, :, planted] = 10.0 * u                           # ... where the planted key lies
    store = _drive(make(), q, k, v, [16, 16, 16, 16])
    assert len(store) < T
    assert bool((store.pos == planted).any(-1).all()), "the planted token was dropped by some head"


def _greedy(model, ids, cache, steps=6, chunk=16):
    with torch.inference_mode():
        logits = prefill(model, ids, cache, chunk)
        out, toks = [logits], []
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            toks.append(int(tok))
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
    return torch.stack(out), toks


@pytest.mark.parametrize("policy", ["select=snapkv++,budget=500", "select=snapkv,budget=1.0", "select=h2o,budget=500",
                                    "select=snapkv++,budget=1.0,read=1.0,page=8"])
def test_budget_at_least_the_context_reproduces_the_full_cache(policy):
    model = tiny_model("gqa")
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    ref, ref_toks = _greedy(model, ids, DynamicCache())
    cache = CompressedCache(model, None, policy + ",dtype=fp32")
    got, toks = _greedy(model, ids, cache)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert toks == ref_toks


def test_head_split_composes():
    """Retrieval heads select (SnapKV++), streaming heads keep their window; the layer holds both, and a budget ≥
    the context on the retrieval heads equals the window policy alone."""
    model = tiny_model("gqa")
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    base = "heads=random:0.5,sink=4,recent=8,dtype=fp32"
    a, ta = _greedy(model, ids, CompressedCache(model, None, base))
    cache = CompressedCache(model, None, base + ",select=snapkv++,budget=500")
    b, tb = _greedy(model, ids, cache)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    kinds = {type(s).__name__ for layer in cache.layers for s in layer.stores}
    assert kinds == {"SnapKVStore", "WindowStore"}
    small = CompressedCache(model, None, base + ",select=snapkv++,budget=20")
    _greedy(model, ids, small)
    assert small.nbytes() < cache.nbytes()


def test_page_upper_bound_holds_for_every_key():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, H, 10 * 8, D, generator=g)                                   # 10 pages of 8
    q = torch.randn(2, H, G, D, generator=g)
    pages = k.view(2, H, 10, 8, D)
    ub = page_upper_bound(q, pages.amin(3), pages.amax(3))                          # [2, H, G, 10]
    true = torch.einsum("bhgd,bhpnd->bhgpn", q, pages)
    assert bool((ub.unsqueeze(-1) >= true - 1e-5).all())
    same = pages[:, :, :, :1].expand_as(pages)                                       # pages of one repeated key: tight
    torch.testing.assert_close(page_upper_bound(q, same.amin(3), same.amax(3)), true[..., 0], atol=1e-5, rtol=0)
    # with only the top dims (RocketKV's estimate) it is no longer a bound everywhere: the trade stage 2 makes
    dims = q.abs().sum(2).topk(4, -1).indices
    part = page_upper_bound(q, pages.amin(3), pages.amax(3), dims)
    assert bool((part.unsqueeze(-1) < true).any())


def test_stage2_reads_chosen_pages_and_every_page_is_dense():
    q, k, v = _qkv(5)
    dense = _drive(SnapKVStore(1.0, torch.float32, obs=8, kernel=3), q, k, v, [T - 1])
    every = _drive(SnapKVStore(1.0, torch.float32, obs=8, kernel=3, read=1.0, page=8), q, k, v, [T - 1])
    some = _drive(SnapKVStore(1.0, torch.float32, obs=8, kernel=3, read=16, page=8, rdims=D), q, k, v, [T - 1])
    pos, new = torch.tensor([T - 1]), (k[:, :, T - 1:], v[:, :, T - 1:])
    ref = dense.attend(q[:, :, T - 1:], pos, 0.25, new=new)[0]
    torch.testing.assert_close(every.attend(q[:, :, T - 1:], pos, 0.25, new=new)[0], ref, atol=1e-5, rtol=0)
    out = some.attend(q[:, :, T - 1:], pos, 0.25, new=new)[0]
    held = 2 * H * (T - 1) * D * 4
    assert every.read_nbytes() == held
    # 2 pages of 8 (+ the open page of 7 tokens) of keys and values, plus 16 dims of min/max for 7 full pages
    assert some.read_nbytes() == H * (2 * 7 * D * 4 + (16 + 7) * 2 * D * 4) < held
    assert (out - ref).abs().max() > 1e-6                                           # it did skip something


def test_chunked_prefill_selects_what_one_forward_selects():
    q, k, v = _qkv(6)
    one = _drive(SnapKVStore(24, torch.float32, obs=12, kernel=5), q, k, v, [T])
    chunked = _drive(SnapKVStore(24, torch.float32, obs=12, kernel=5), q, k, v, [5, 20, 1, 33, 5])
    assert torch.equal(one.pos, chunked.pos)
    torch.testing.assert_close(one.k, chunked.k)


def test_generate_path_selects_at_the_first_decode_step():
    q, k, v = _qkv(7)
    explicit = _drive(SnapKVStore(24, torch.float32, obs=12, kernel=5), q, k, v, [T - 1])
    lazy = _drive(SnapKVStore(24, torch.float32, obs=12, kernel=5), q, k, v, [T - 1], finish=False)
    assert len(lazy) == T - 1
    pos, new = torch.tensor([T - 1]), (k[:, :, T - 1:], v[:, :, T - 1:])
    a = lazy.attend(q[:, :, T - 1:], pos, 0.25, new=new)[0]
    b = explicit.attend(q[:, :, T - 1:], pos, 0.25, new=new)[0]
    assert torch.equal(lazy.pos, explicit.pos) and len(lazy) == 24
    torch.testing.assert_close(a, b)
    lazy.append(*new, pos)
    assert len(lazy) == 25                                                          # later tokens are kept


def test_h2o_holds_its_budget_and_keeps_recent_tokens():
    q, k, v = _qkv(8)
    store = H2OStore(12, torch.float32)
    start = 0
    for n in [20, 1, 1, 5, 1, 30, 1, 1, 1, 1, 1, 1]:
        pos = torch.arange(start, start + n)
        store.attend(q[:, :, start:start + n], pos, 0.25, new=(k[:, :, start:start + n], v[:, :, start:start + n]))
        store.append(k[:, :, start:start + n], v[:, :, start:start + n], pos)
        start += n
        assert len(store) == min(12, start) and store.acc.shape[-1] == len(store)
        assert bool((store.pos[..., -6:] == torch.arange(start - 6, start).view(1, 1, -1)).all()) or start < 12
    assert store.nbytes() == 12 * H * (2 * D * 4 + 4 + 4)


@pytest.mark.parametrize("policy,msg", [("select=snapkv++", "needs a budget"), ("budget=100", "need a token selection"),
                                        ("select=h2o,budget=100,k=4,v=4", "only select=snapkv++"),
                                        ("select=snapkv++,budget=100,krank=4", "does not compose"),
                                        ("select=h2o,budget=100,read=32", "stage 2"),
                                        ("select=snapkv++,budget=100,kernel=4", "must be odd"),
                                        ("select=snapkv++,budget=1.5", "outside (0, 1]"),
                                        ("select=quest,budget=10", "not one of")])
def test_refusals(policy, msg):
    with pytest.raises(KvtoolError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        CompressedCache(tiny_model("gqa"), None, policy)


def test_bench_query_regimes_and_read_bytes(capsys, tiny_with_profile):
    """`kvtool bench --query inside|after`: the same samples in both regimes; rows carry the bytes a decode step
    read (stage 2 reads fewer than it holds); --query after is refused for nll."""
    import json

    from test_cli import assert_one_line_error, run

    model, prof = tiny_with_profile
    pols = "select=snapkv++,budget=48,obs=8,kernel=7;select=snapkv++,budget=48,obs=8,kernel=7,read=16,page=8"
    rows = {}
    for query in ("inside", "after"):
        code, out, err = run(capsys, "bench", model, "--profile", prof, "--task", "passkey", "--lengths", "128",
                             "--depths", "2", "--policies", pols, "--baselines", "none", "--query", query, "--json")
        assert code == 0, err
        rows[query] = json.loads(out)
    for query, got in rows.items():
        assert [r["cache"] for r in got] == ["full"] + pols.split(";")
        assert all(r.get("query") == (None if query == "inside" else "after") for r in got)
        full, sel, sparse = got
        assert full["read_MiB"] == full["kv_MiB"] and sel["read_MiB"] <= sel["kv_MiB"] < full["kv_MiB"]
        assert sparse["read_MiB"] < sel["read_MiB"]
    assert rows["inside"][0]["hits"] == rows["after"][0]["hits"]          # the full cache cannot tell them apart
    code, _, err = run(capsys, "bench", model, "--profile", prof, "--task", "nll", "--query", "after")
    assert_one_line_error(code, err, "--query after applies to --task passkey and passkey-chat")


def test_calibrated_window_and_kernel_are_the_store_defaults(capsys, tiny_with_profile, tmp_path):
    """`kvtool calibrate --method snapkv` writes per-layer obs / kernel with their recall; a SnapKV store built from
    that profile takes them unless the policy sets its own."""
    from kvtool.models import load_model
    from kvtool.profile import Profile
    from test_cli import run

    model_dir, prof = tiny_with_profile
    out = tmp_path / "snap.kv.st"
    code, _, err = run(capsys, "calibrate", "--method", "snapkv", model_dir, "--profile", prof, "--samples", "1",
                       "--seq-len", "192", "--windows", "4,16", "--kernels", "1,5", "--future", "16", "-o", out)
    assert code == 0, err
    p = Profile.load(out)
    assert set(p["snapkv.obs"].tolist()) <= {4, 16} and set(p["snapkv.kernel"].tolist()) <= {1, 5}
    recall = p["snapkv.recall"]
    assert bool(((recall > 0) & (recall <= 1 + 1e-6)).all())
    assert torch.allclose(recall, p["snapkv.grid"].flatten(1).amax(1))
    model, _ = load_model(str(model_dir))
    cache = CompressedCache(model, p, "select=snapkv++,budget=32")
    for i, layer in enumerate(cache.layers):
        (store,) = layer.stores
        assert (store.obs, store.kernel) == (int(p["snapkv.obs"][i]), int(p["snapkv.kernel"][i]))
    cache = CompressedCache(model, p, "select=snapkv++,budget=32,obs=8,kernel=3")
    assert {(s.obs, s.kernel) for layer in cache.layers for s in layer.stores} == {(8, 3)}


def test_kept_tokens_in_a_body_store_read_as_kept_here():
    """SnapKV++ moving its kept tokens into a body store (positions compacted): with a 16-bit QuantizedStore as the
    body, prefill + decode equal the store that keeps them itself; tokens after the selection go to the body."""
    from kvtool.stores import QuantizedStore

    q, k, v = _qkv(9)
    plain = _drive(SnapKVStore(24, torch.float32, obs=8, kernel=5), q, k, v, [T - 4])
    moved = _drive(SnapKVStore(24, torch.float32, obs=8, kernel=5,
                               body=lambda: QuantizedStore(16, 16, 2, 3, torch.float32)), q, k, v, [T - 4])
    assert moved.body is not None and len(moved.body) == 24 and torch.equal(moved.pos, plain.pos)
    for i in range(T - 4, T):
        pos, new = torch.tensor([i]), (k[:, :, i:i + 1], v[:, :, i:i + 1])
        a, la = plain.attend(q[:, :, i:i + 1], pos, 0.25, new=new)
        b, lb = moved.attend(q[:, :, i:i + 1], pos, 0.25, new=new)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
        plain.append(*new, pos)
        moved.append(*new, pos)
    assert len(moved) == len(plain) == 28
    # the generate path (no finish_prefill: the store selects at the first decode step) moves into the body too
    lazy = _drive(SnapKVStore(24, torch.float32, obs=8, kernel=5,
                              body=lambda: QuantizedStore(16, 16, 2, 3, torch.float32)), q, k, v, [T - 4], finish=False)
    fresh = _drive(SnapKVStore(24, torch.float32, obs=8, kernel=5), q, k, v, [T - 4])
    pos, new = torch.tensor([T - 4]), (k[:, :, T - 4:T - 3], v[:, :, T - 4:T - 3])
    torch.testing.assert_close(lazy.attend(q[:, :, T - 4:T - 3], pos, 0.25, new=new)[0],
                               fresh.attend(q[:, :, T - 4:T - 3], pos, 0.25, new=new)[0], atol=1e-5, rtol=0)
    assert lazy.body is not None and len(lazy) == 24


def test_snapkv_with_quantized_kept_tokens_in_the_cache(tiny_with_profile):
    """select=snapkv++ with k=4,v=4: the same tokens are selected, then held in 4 bits (fewer bytes); the model's
    greedy decode still runs and stays near the 16-bit selection."""
    from kvtool.models import load_model
    from kvtool.profile import Profile

    model_dir, prof = tiny_with_profile
    model, _ = load_model(str(model_dir))
    p = Profile.load(prof)
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(5))
    base = "select=snapkv++,budget=64,obs=8,kernel=7,sink=4,buffer=8"
    c16, c4 = CompressedCache(model, p, base), CompressedCache(model, p, base + ",k=4,v=4")
    a, _ = _greedy(model, ids, c16, steps=3)
    b, _ = _greedy(model, ids, c4, steps=3)
    s16, s4 = c16.layers[1].stores[0], c4.layers[1].stores[0]
    assert torch.equal(s16.pos[..., :64], s4.pos) and type(s4.body).__name__ == "QuantizedStore" and s4.body.n_body > 0
    assert c4.nbytes() < 0.75 * c16.nbytes()                        # sink + up to buffer + 31 tokens stay 16-bit
    assert (a - b).abs().max() > 0                                   # it did quantize something
    assert torch.nn.functional.cosine_similarity(a[-1], b[-1], dim=-1).min() > 0.9
