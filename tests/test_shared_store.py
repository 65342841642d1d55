"""The shared-key store (PoD, kvtool/stores/shared.py) and its cache plumbing: a layer group's distant keys stored once
by the leader, proximal tokens per layer, values per layer, partial softmaxes merged by log-sum-exp."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, identical_keys_model, tiny_model
from kvtool.cache import CompressedCache, prefill, with_cache
from kvtool.errors import KvtoolError
from kvtool.profile import Profile, model_meta
from kvtool.stores import SharedKeys, SharedStore, merge, partial
from kvtool.stores.base import tensor_bytes
from kvtool.windows import causal_allowed

B, H, G, D, T = 1, 2, 2, 16, 45


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * G, T, D, generator=g), torch.randn(B, H, T, D, generator=g) * 1.5,
            torch.randn(B, H, T, D, generator=g))


def _drive(stores, q, k, v, chunks):
    """Layers in order per chunk: each attends (held + the chunk exactly) then appends, as attend_layer does.
    stores: [(store, k, v)], the leader first. → [out [B, hq, T, D]] per store."""
    outs = [[] for _ in stores]
    start = 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        sl = slice(start, start + n)
        for i, (s, kk, vv) in enumerate(stores):
            o, lse = s.attend(q[:, :, sl], pos, 0.25, new=(kk[:, :, sl], vv[:, :, sl]))
            assert torch.isfinite(o).all()
            s.append(kk[:, :, sl], vv[:, :, sl], pos)
            outs[i].append(o)
        start += n
    return [torch.cat(o, 2) for o in outs]


@pytest.mark.parametrize("chunks", [[T], [10, 1, 1, 13, 1, 19], [1] * T], ids=["one", "mixed", "decode"])
def test_member_with_identical_keys_equals_full_attention(chunks):
    """Both parts exact (the leader's keys are the member's own, identity map): proximal ⊕ distant = full causal
    attention, in one chunk, mixed chunks and decode steps; the member's values are its own."""
    q, k, v = _qkv()
    v2 = torch.randn_like(v)
    bank = SharedKeys(0, torch.arange(H), 3, torch.float32)
    lead = SharedStore(bank, True, 3, 7, torch.float32)
    eye = torch.eye(D).expand(H, D, D)
    member = SharedStore(bank, False, 3, 7, torch.float32, torch.arange(H), eye)
    got_l, got_m = _drive([(lead, k, v), (member, k, v2)], q, k, v, chunks)
    allowed = causal_allowed(torch.arange(T), torch.arange(T))
    torch.testing.assert_close(got_l, partial(q, k, v, 0.25, allowed)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_m, partial(q, k, v2, 0.25, allowed)[0], atol=1e-5, rtol=0)


def test_member_reads_the_leaders_keys_for_distant_tokens_only():
    """With different keys per layer, a member equals the oracle over [leader's keys for distant positions | its own
    keys for sink + recent], mapped through w (pod=map) — so the split and the map are really applied."""
    q, k, v = _qkv(1)
    k2 = torch.randn_like(k)
    w = torch.randn(H, D, D) / D ** 0.5
    bank = SharedKeys(0, torch.arange(H), 3, torch.float32)
    lead = SharedStore(bank, True, 3, 7, torch.float32)
    member = SharedStore(bank, False, 3, 7, torch.float32, torch.tensor([1, 0]), w)     # bank rows swapped
    _, got = _drive([(lead, k, v), (member, k2, v)], q, k, v, [12, 1, 32])
    mapped = torch.matmul(k[:, [1, 0]], w)                                              # [B, H, T, D]
    pos = torch.arange(T)
    qp, kp = pos.view(-1, 1), pos.view(1, -1)
    prox = (kp <= qp) & ((kp < 3) | (qp - kp < 7))
    dist = (kp <= qp) & ~prox
    ref = merge([partial(q, k2, v, 0.25, prox), partial(q, mapped, v, 0.25, dist)])[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (got - partial(q, k2, v, 0.25, kp <= qp)[0]).abs().max() > 1e-2             # not the member's own keys


def test_member_cannot_read_ahead_of_its_leader():
    q, k, v = _qkv(2)
    bank = SharedKeys(4, torch.arange(H), 3, torch.float32)
    lead = SharedStore(bank, True, 3, 7, torch.float32)
    member = SharedStore(bank, False, 3, 7, torch.float32, torch.arange(H))
    lead.append(k[:, :, :20], v[:, :, :20], torch.arange(20))
    member.append(k[:, :, :20], v[:, :, :20], torch.arange(20))
    # the member's next chunk 20..39 needs distant keys up to 39 - 7 = 32; the leader holds 0..19 only
    with pytest.raises(KvtoolError, match="leader layer 4 has not appended"):
        member.attend(q[:, :, 20:40], torch.arange(20, 40), 0.25, new=(k[:, :, 20:40], v[:, :, 20:40]))
    # a chunk whose distant part the leader already holds (query 20..26 → distant up to 19) is fine
    o, _ = member.attend(q[:, :, 20:27], torch.arange(20, 27), 0.25, new=(k[:, :, 20:27], v[:, :, 20:27]))
    assert torch.isfinite(o).all()


def test_nbytes_counts_shared_keys_once_and_the_maps():
    q, k, v = _qkv(3)
    bank = SharedKeys(0, torch.arange(H), 3, torch.float32)
    lead = SharedStore(bank, True, 3, 7, torch.float32)
    w = torch.eye(D).expand(H, D, D).clone()
    members = [SharedStore(bank, False, 3, 7, torch.float32, torch.arange(H), w) for _ in range(2)]
    assert lead.nbytes() == 0 and members[0].nbytes() == 0
    _drive([(lead, k, v)] + [(m, k, v) for m in members], q, k, v, [20, 25])
    per_token = H * D * 4
    assert bank.nbytes() == (T - 3) * per_token                                   # keys of positions 3.. once
    assert lead.nbytes() == 3 * 2 * per_token + (T - 3) * per_token + bank.nbytes()
    for m in members:                                                              # sink k+v, all values, 7 keys, maps
        assert m.nbytes() == 3 * 2 * per_token + (T - 3) * per_token + 7 * per_token + H * D * D * 4
    full = 3 * T * 2 * per_token
    assert lead.nbytes() + sum(m.nbytes() for m in members) == full - 2 * (T - 3 - 7) * per_token + 2 * tensor_bytes(w)
    lead.reset()
    assert bank.nbytes() == 0 and lead.nbytes() == 0


# ---- the cache: a tiny model whose layer 1 has layer 0's keys -------------------------------------------------------

def _pod_profile(model, leader, maps=None):
    cfg = model.config
    layers, heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    leader = torch.tensor(leader).view(-1, 1).expand(layers, heads).contiguous()
    maps = torch.eye(d).expand(layers, heads, d, d).contiguous() if maps is None else maps
    return Profile(tensors={"layers.pod.leader": leader, "layers.pod.group": leader.clone(), "layers.pod.map": maps},
                   model=model_meta(model), calibration={"methods": {}})


@torch.no_grad()
def _greedy(model, cache, ids, steps=6, chunk=16):
    logits = [prefill(model, ids, cache, chunk)]
    tokens = []
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
        logits.append(model(input_ids=tok, **with_cache(model, cache), use_cache=True).logits[:, -1])
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("mode", ["on", "map"])
def test_shared_cache_reproduces_the_full_cache_with_identical_layers(mode):
    model = identical_keys_model(seed=3)
    prof = _pod_profile(model, [0, 0, 2])
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(0))
    full = CompressedCache(model, None, "heads=all")
    shared = CompressedCache(model, prof, f"heads=all,pod={mode},sink=2,podrecent=5")
    assert 0 in shared.banks and isinstance(shared.layers[1].groups[0].store, SharedStore)
    t_full, l_full = _greedy(model, full, ids)
    t_shared, l_shared = _greedy(model, shared, ids)
    assert t_full == t_shared
    torch.testing.assert_close(l_shared, l_full, atol=1e-3, rtol=1e-3)
    # layer 1 held its keys only for 2 sink + 5 recent tokens; the shared keys are counted once, in layer 0
    n = ids.shape[1] + 6
    per_token = model.config.num_key_value_heads * 16 * 2                                  # fp16 storage
    assert shared.layers[1].nbytes() == n * per_token + 7 * per_token + (2 * 16 * 16 * 2 if mode == "map" else 0)
    assert shared.layers[0].nbytes() == 2 * n * per_token


def test_shared_cache_differs_when_layers_differ():
    """Not vacuous: on a model whose layers have their own keys, sharing layer 0's keys changes the logits."""
    model = tiny_model("gqa", seed=3)
    prof = _pod_profile(model, [0, 0, 2])
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(0))
    _, l_full = _greedy(model, CompressedCache(model, None, "heads=all"), ids)
    _, l_shared = _greedy(model, CompressedCache(model, prof, "heads=all,pod=on,sink=2,podrecent=5"), ids)
    assert (l_full - l_shared).abs().max() > 1e-2


def test_streaming_heads_keep_their_window_in_a_shared_layer():
    """heads split + pod: streaming heads keep their WindowStore; a member's retrieval head shares the leader's keys
    only where it is a retrieval head in the leader too; the bank holds only the heads a member reads."""
    model = identical_keys_model(seed=3)
    prof = _pod_profile(model, [0, 0, 2])
    policy = "heads=random:0.5:4"                                       # retrieval [[1, 1], [0, 1], [0, 0]]
    cache = CompressedCache(model, prof, policy + ",pod=on,sink=2,podrecent=5")
    assert cache.retrieval.int().tolist() == [[1, 1], [0, 1], [0, 0]]
    kinds = [[(type(g.store).__name__, None if g.kv_heads is None else g.kv_heads.tolist()) for g in layer.groups]
             for layer in cache.layers]
    assert kinds == [[("SharedStore", [1]), ("QuantizedStore", [0])], [("SharedStore", [1]), ("WindowStore", [0])],
                     [("WindowStore", None)]]
    assert cache.banks[0].heads.tolist() == [1]
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    t_ref, l_ref = _greedy(model, CompressedCache(model, None, policy), ids)
    t_got, l_got = _greedy(model, cache, ids)                          # identical keys: same as without sharing
    assert t_got == t_ref
    torch.testing.assert_close(l_got, l_ref, atol=1e-3, rtol=1e-3)


def test_one_line_errors():
    model = tiny_model("gqa")
    empty = Profile(tensors={}, model=model_meta(model), calibration={"methods": {}})
    with pytest.raises(KvtoolError, match="layers.pod"):
        CompressedCache(model, empty, "heads=all,pod=on")
    with pytest.raises(KvtoolError, match="layers.pod"):
        CompressedCache(model, None, "heads=all,pod=map")
    with pytest.raises(KvtoolError, match="k or v below 16"):
        CompressedCache(model, _pod_profile(model, [0, 0, 2]), "heads=all,pod=on,k=4")
    sliding = tiny_model("sliding")
    with pytest.raises(KvtoolError, match="spans sliding-window layer 1"):
        CompressedCache(sliding, _pod_profile(sliding, [0, 0, 2]), "heads=all,pod=on")
    with pytest.raises(KvtoolError, match="pod"):
        CompressedCache(model, None, "heads=all,pod=yes")
