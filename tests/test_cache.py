"""CompressedCache: lossless equals DynamicCache; head-split equals a full-sequence masked oracle through chunked
prefill and decoding; memory really dropped and counted exactly; bad policies and foreign profiles refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from calibrate.duo import _duo_attention, _DuoState
from conftest import needle_sample, tiny_model
from kvtool.api import profile_model
from kvtool.cache import CompressedCache, prefill, use_kvtool_attention, with_cache
from kvtool.errors import KvtoolError
from kvtool.policy import Policy
from kvtool.stores import QuantizedStore, QuantizedWindowStore, SlidingStore, WindowStore
from kvtool.trace import Dims, TraceConfig


def oracle_logits(model, ids, retrieval: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Full-sequence logits where streaming heads see only sink + recent keys (duo student with 0/1 gates)."""
    state = _DuoState(retrieval.float(), Dims.of(model), sink, recent, "student")
    state.mode = "student"
    with _duo_attention(model, state), torch.no_grad():
        return model(ids, use_cache=False).logits[0]                          # [T, V]


def cached_logits(model, ids, policy: str, prompt: int, chunk: int):
    """Prefill ids[:prompt] in chunks, then decode the rest one token at a time (teacher-forced); logits [T', V]."""
    use_kvtool_attention(model)
    cache = CompressedCache(model, None, policy)
    rows = []
    with torch.no_grad():
        for start in range(0, prompt, chunk):
            out = model(ids[:, start:min(start + chunk, prompt)], **with_cache(model, cache), use_cache=True)
            rows.append(out.logits[0])
        for t in range(prompt, ids.shape[1]):
            rows.append(model(ids[:, t:t + 1], **with_cache(model, cache), use_cache=True).logits[0])
    model.set_attn_implementation("sdpa")
    return torch.cat(rows), cache


@pytest.mark.parametrize("kind", ["gqa", "mha", "mqa"])
def test_lossless_policy_equals_dynamic_cache(kind):
    model = tiny_model(kind)
    ids = needle_sample(T=90).input_ids.view(1, -1)
    with torch.no_grad():
        ref = model(ids, **with_cache(model, DynamicCache(config=model.config)), use_cache=True).logits[0]
        ref_gen = model.generate(ids[:, :60], max_new_tokens=10, do_sample=False)
    got, cache = cached_logits(model, ids, "heads=all,dtype=model", prompt=60, chunk=16)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    use_kvtool_attention(model)
    gen = model.generate(ids[:, :60], max_new_tokens=10, do_sample=False,
                         **with_cache(model, CompressedCache(model, None, "heads=all,dtype=model")))
    model.set_attn_implementation("sdpa")
    assert torch.equal(gen, ref_gen)
    assert cache.get_seq_length() == 90 and cache.nbytes() == cache.full_nbytes(torch.float32)


@pytest.mark.parametrize("policy", ["heads=random:0.5:1,sink=4,recent=16,dtype=model", "heads=none,sink=3,recent=9,dtype=fp32",
                                    "heads=random:0.25:2,sink=0,recent=5,dtype=model"])
def test_head_split_equals_masked_oracle(policy):
    model = tiny_model("gqa")
    ids = needle_sample(T=80).input_ids.view(1, -1)
    got, cache = cached_logits(model, ids, policy, prompt=50, chunk=7)      # chunks cross the sink boundary
    ref = oracle_logits(model, ids, cache.retrieval, cache.policy.sink, cache.policy.recent)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_streaming_tokens_are_really_dropped_and_counted():
    model = tiny_model("gqa")                                                 # 3 layers, 2 KV heads, D = 16, fp32
    ids = needle_sample(T=100).input_ids.view(1, -1)
    use_kvtool_attention(model)
    cache = CompressedCache(model, None, "heads=random:0.5:0,sink=4,recent=16,dtype=model")
    prefill(model, ids, cache, chunk=32)
    model.set_attn_implementation("sdpa")
    R = int(cache.retrieval.sum())
    S = cache.retrieval.numel() - R
    expected = 2 * 16 * 4 * (R * 100 + S * (4 + 16))
    held = sum(t.numel() * t.element_size() for layer in cache.layers for s in layer.stores for t in s.tensors())
    assert cache.nbytes() == held == expected
    for i, layer in enumerate(cache.layers):
        for store in layer.stores:
            if isinstance(store, WindowStore):
                assert store.recent_k.shape[2] == 16 and store.sink_k.shape[2] == 4 and len(store) == 20
            else:
                assert isinstance(store, QuantizedStore) and len(store) == 100
    assert cache.full_nbytes(torch.float32) == 2 * 3 * 2 * 100 * 16 * 4


@pytest.mark.parametrize("text,needle", [
    ("heads=duo:1.5", "outside [0, 1]"), ("heads=random", "needs a fraction"), ("sink=-1", "'sink' must be at least 0"),
    ("recent=abc", "'recent': 'abc' is not a whole number"), ("bogus=1", "unknown policy field 'bogus'"),
    ("heads", "is not key=value"), ("k=5bit", "'k': 5 bits is not supported"), ("v=four", "'v': 'four' is not a bit"),
    ("sink=4,sink=5", "given twice"), ("krope=mid", "'krope': 'mid' is not one of"), ("kclip=0.9", "'kclip': 0.9"),
    ("outliers=yes", "'outliers'"), ("codebook=lloyd", "'codebook'"), ("vgroup=0", "'vgroup' must be at least 1"),
    ("dtype=int8", "'dtype'"), ("heads=0.5", "bare fraction needs a profile"),
])
def test_malformed_policy_names_the_field(text, needle):
    with pytest.raises(KvtoolError, match=needle.replace("[", "\\[").replace("]", "\\]")):
        Policy.parse(text)


def test_policy_from_profile_and_foreign_profile_refused():
    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16, query_samples=8))
    with pytest.raises(KvtoolError, match="has no heads.duo.mask"):
        CompressedCache(model, prof, "heads=duo")
    prof.tensors["heads.duo.mask"] = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.uint8)
    prof.tensors["heads.duo.score"] = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    assert CompressedCache(model, prof, "heads=duo").retrieval.sum() == 4
    assert CompressedCache(model, prof, "heads=duo:0.5").retrieval.tolist() == [[True, False], [False, True],
                                                                                 [True, False]]
    with pytest.raises(KvtoolError, match="different model"):
        CompressedCache(tiny_model("gqa", seed=5), prof, "heads=duo")


def test_window_rule_by_hand():
    from kvtool.windows import window_allowed

    got = window_allowed(torch.arange(6), torch.arange(6), sink=1, recent=2).int().tolist()
    assert got == [[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 0, 1, 1, 0, 0],
                   [1, 0, 0, 1, 1, 0],
                   [1, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("policy", ["heads=all,dtype=model", "heads=random:0.5:1,sink=4,recent=16,dtype=model"])
def test_sliding_window_layers_match_dynamic_cache(policy):
    """Qwen3-style `layer_types` with sliding_attention (window 24): the model's own sliding layers keep only their
    window (really freed), and greedy tokens equal DynamicCache's (exactly for the lossless policy)."""
    model = tiny_model("sliding", layers=4)
    ids = needle_sample(T=70).input_ids.view(1, -1)
    with torch.no_grad():
        ref = model.generate(ids[:, :50], max_new_tokens=12, do_sample=False)
        ref_logits = model(ids, **with_cache(model, DynamicCache(config=model.config)), use_cache=True).logits[0]
    if policy == "heads=all,dtype=model":
        got, cache = cached_logits(model, ids, policy, prompt=50, chunk=16)     # chunks wider than nothing, decode
        torch.testing.assert_close(got, ref_logits, atol=2e-5, rtol=0)
    use_kvtool_attention(model)
    cache = CompressedCache(model, None, policy)
    with torch.no_grad():
        gen = model.generate(ids[:, :50], max_new_tokens=12, do_sample=False, **with_cache(model, cache))
    model.set_attn_implementation("sdpa")
    if policy == "heads=all,dtype=model":
        assert torch.equal(gen, ref)
    window = model.config.sliding_window
    for i, layer in enumerate(cache.layers):
        sliding = model.config.layer_types[i] == "sliding_attention"
        assert layer.is_sliding == sliding
        if sliding:
            (store,) = layer.stores
            assert isinstance(store, SlidingStore) and len(store) == window - 1
    seen = cache.get_seq_length()
    assert seen == 61
    full = sum(min(seen, window - 1) if t == "sliding_attention" else seen for t in model.config.layer_types)
    assert cache.full_nbytes(torch.float32) == 2 * 2 * full * 16 * 4


def test_cupy_decode_dispatch_plumbing_on_cpu(monkeypatch):
    """The fused decode path (backend "cupy", one token) hands each store's parts to the kernels; with the kernels'
    torch twins standing in for CUDA, its greedy tokens equal the torch path's."""
    import cupy_kernels
    from cupy_kernels import reference
    from kvtool.api import profile_model
    from kvtool.trace import TraceConfig

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)                                   # head_dim 32: a shape the kernels take
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)).eval()
    prof = profile_model(model, [needle_sample(T=96, seed=s) for s in range(2)],
                         config=TraceConfig(sink=4, recent=16, query_samples=8))
    calls = []

    def twin(name):
        def run(*args, backend="torch", **kw):
            calls.append(name)
            return getattr(reference, name)(*args, **kw).to(args[0].dtype)
        return run

    monkeypatch.setattr(cupy_kernels, "decode_attention", twin("decode_attention"))
    monkeypatch.setattr(cupy_kernels, "window_attention", twin("window_attention"))
    ids = needle_sample(T=60, seed=4).input_ids.view(1, -1)
    policy = "heads=random:0.5:1,k=8,v=8,sink=4,recent=16,buffer=8"
    outs = {}
    for backend in ("torch", "cupy"):
        cache = CompressedCache(model, prof, policy, backend="torch")
        for layer in cache.layers:
            layer.backend = backend
            for store in layer.stores:
                store.dtype = torch.float16
        with torch.no_grad():
            outs[backend] = model.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(model, cache))
    model.set_attn_implementation("sdpa")
    assert {"decode_attention", "window_attention"} <= set(calls)
    assert torch.equal(outs["torch"], outs["cupy"])


def test_quantized_window_keeps_the_window_in_fewer_bytes():
    """wk/wv: streaming heads keep sink + recent with the window's older tokens quantized (8 bits here): logits stay
    close to the 16-bit window's, tokens past the window are freed (at most 31 wait for the next cut), bytes drop."""
    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=96, seed=s) for s in range(2)],
                         config=TraceConfig(sink=4, recent=16, query_samples=8))
    ids = needle_sample(T=210, seed=3).input_ids.view(1, -1)
    base = "heads=random:0.5:1,sink=4,recent=96,buffer=8,dtype=fp32"
    outs, caches = {}, {}
    for name, policy in (("plain", base), ("q8", base + ",wk=8,wv=8,krope=pre")):
        use_kvtool_attention(model)
        cache = CompressedCache(model, prof, policy)
        with torch.no_grad():
            outs[name] = torch.cat([model(ids[:, s:s + 30], **with_cache(model, cache), use_cache=True).logits[0]
                                    for s in range(0, 210, 30)])
        caches[name] = cache
    model.set_attn_implementation("sdpa")
    diff = (outs["q8"] - outs["plain"]).abs().max()
    assert 0 < diff < 0.05 * outs["plain"].abs().max()
    windows = [s for layer in caches["q8"].layers for s in layer.stores if isinstance(s, QuantizedWindowStore)]
    assert windows and all(4 + 95 <= len(s) <= 4 + 96 + 31 and s.n_body > len(s) for s in windows)
    assert caches["q8"].nbytes() < caches["plain"].nbytes()


def test_quantized_window_refuses_a_window_shorter_than_its_buffer():
    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16, query_samples=8))
    with pytest.raises(KvtoolError, match="recent=16 is shorter than buffer=8"):
        CompressedCache(model, prof, "heads=none,sink=4,recent=16,buffer=8,wk=4")



def test_rope_table_is_shared_by_the_model_and_reported_apart():
    """Pre-RoPE stores read one cos/sin table per model (kvtool.kvstore.RopeTable), shared by every layer and every
    cache of the model: it is not in nbytes() (per-sequence state), shared_nbytes() reports it, and it grows to the
    positions seen rounded up to ROPE_STEP (not to twice that). Post-RoPE policies read no table."""
    from kvtool.kvstore import ROPE_STEP

    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=96, seed=s) for s in range(2)],
                         config=TraceConfig(sink=4, recent=16, query_samples=8))
    ids = needle_sample(T=2 * ROPE_STEP + 40, seed=3).input_ids.view(1, -1)
    pre = "heads=random:0.5:1,sink=4,recent=64,buffer=8,k=4,v=4,krope=pre,wk=4,wv=4"
    caches = [CompressedCache(model, prof, p) for p in (pre, pre, "heads=all,k=4,v=4,krope=post")]
    for cache in caches:
        with torch.no_grad():
            prefill(model, ids, cache, 128)
    model.set_attn_implementation("sdpa")
    a, b, post = caches
    assert len(a._rope_tables) == 1 and a._rope_tables[0] is b._rope_tables[0]     # one table: both caches, all layers
    table = a._rope_tables[0]
    d = Dims.of(model).head_dim
    assert table.cos.shape == (3 * ROPE_STEP, d)                                    # 1064 positions -> 1536 rows
    assert a.shared_nbytes() == b.shared_nbytes() == 3 * 3 * ROPE_STEP * d * 4    # cos, sin, signed sin; float32
    assert post.shared_nbytes() == 0 and post._rope_tables == []
