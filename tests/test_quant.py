"""KV quantization: packing, error bounds per bit width, the quantized cache's bytes and behaviour inside generate.

Error bounds (stated, checked element-wise):
- uniform b-bit codes round to the nearest of 2^b levels, so |x - x̂| ≤ span / (2 (2^b - 1)) (+ float16 rounding of
  the per-token scales for values: ≤ 2^-10 relative to the group's magnitude);
- key elements outside the calibrated range are clamped (error = distance to the range) or, with outliers=on,
  stored exactly in float16.
"""

from __future__ import annotations

import pytest
import torch

from conftest import needle_sample, tiny_model
from kvtool import quant
from kvtool.api import profile_model
from kvtool.cache import CompressedCache, prefill, with_cache
from kvtool.errors import KvtoolError
from kvtool.kvstore import RopeTable
from kvtool.stores import QuantizedStore
from kvtool.trace import TraceConfig


@pytest.mark.parametrize("bits", quant.BITS)
def test_pack_roundtrip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, 24), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 24 * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes)
    # the documented layout: little-endian integer of 8 codes, `bits` bits each
    word = sum(int(c) << (bits * i) for i, c in enumerate(codes[0, 0, 0, :8]))
    assert packed[0, 0, 0, :bits].tolist() == [(word >> (8 * j)) & 0xFF for j in range(bits)]


@pytest.mark.parametrize("bits", quant.BITS)
def test_per_token_value_error_bound(bits):
    x = torch.randn(2, 3, 17, 64) * 3 + 0.5
    packed, lo, span = quant.quantize_tokens(x, bits, group=32)
    y = quant.dequantize_tokens(packed, lo, span, bits)
    g = x.reshape(2, 3, 17, 2, 32)
    true_span = (g.amax(-1) - g.amin(-1)).unsqueeze(-1)
    scale_err = 2 * 2 ** -10 * g.abs().amax(-1, keepdim=True)             # float16 rounding of lo and span
    bound = true_span / (2 * (2 ** bits - 1)) + scale_err
    err = (y - x).abs().reshape(2, 3, 17, 2, 32)
    assert (err <= bound + 1e-6).all()
    assert packed.numel() == x.numel() * bits // 8 and lo.dtype == torch.float16


@pytest.mark.parametrize("bits", quant.BITS)
def test_per_channel_key_error_bound_and_clamping(bits):
    x = torch.randn(1, 2, 40, 16)
    lo, hi = x.amin((0, 2)) + 0.3, x.amax((0, 2)) - 0.3                     # a clipped range: some elements outside
    q = quant.ChannelQuantizer.from_range(lo, hi, bits)
    y = q.dequantize(q.quantize(x))
    inside = (x >= lo[None, :, None]) & (x <= hi[None, :, None])
    step = (hi - lo)[None, :, None].expand_as(x) / (2 * (2 ** bits - 1))
    assert ((y - x).abs()[inside] <= step[inside] + 1e-5).all()
    clamped = torch.maximum(torch.minimum(x, hi[None, :, None]), lo[None, :, None])
    assert ((y - clamped).abs() <= step + 1e-5).all()


def test_codebook_levels_are_used():
    levels = torch.tensor([0.0, 0.1, 0.2, 1.0])
    t = torch.tensor([0.04, 0.06, 0.55, 0.61, 0.97])
    codes = quant.encode(t, levels)
    assert codes.tolist() == [0, 1, 2, 3, 3]
    assert torch.equal(quant.decode(codes, levels), torch.tensor([0.0, 0.1, 0.2, 1.0, 1.0]))
    per_head = torch.stack([levels, torch.tensor([0.0, 0.5, 0.6, 1.0])])    # [H=2, 4]
    x = torch.tensor([0.52, 0.52]).view(1, 2, 1)
    assert quant.encode(x, per_head).view(-1).tolist() == [2, 1]


def test_rope_unrotate_inverts_the_model_rotation():
    model = tiny_model("gqa")
    rope = RopeTable.of(model, 16)
    x = torch.randn(1, 2, 9, 16)
    assert torch.allclose(rope.unrotate(rope.rotate(x, 5), 5), x, atol=1e-5)
    cos, sin = model.model.rotary_emb(x, torch.arange(5, 14).view(1, -1))   # the model's own rotation
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(rope.rotate(x, 5), ref, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_with_profile():
    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=96, seed=s) for s in range(2)],
                         config=TraceConfig(sink=4, recent=16, query_samples=8))
    return model, prof


@pytest.mark.parametrize("policy", ["heads=all,k=4,v=4,sink=4,buffer=8", "heads=random:0.5:3,k=2,v=3,sink=2,recent=8,buffer=4",
                                    "heads=all,k=3,v=8,krope=pre,sink=0,buffer=0,kclip=1",
                                    "heads=all,k=2,v=2,outliers=on,kclip=0.99,buffer=5"])
def test_nbytes_is_exactly_what_is_held(tiny_with_profile, policy):
    model, prof = tiny_with_profile
    ids = needle_sample(T=100, seed=7).input_ids.view(1, -1)
    cache = CompressedCache(model, prof, policy)
    prefill(model, ids, cache, chunk=32)
    p, D = cache.policy, 16
    held = 0
    for layer in cache.layers:
        R = sum(len(g.kv_heads) if g.kv_heads is not None else 2 for g in layer.groups if isinstance(g.store, QuantizedStore))
        S = 2 - R
        qs = [g.store for g in layer.groups if isinstance(g.store, QuantizedStore)]
        body = qs[0].n_body if qs else 0
        buf = 0 if not qs else qs[0].buf_k.shape[2]
        if qs:                                        # tokens leave the buffer in groups of `flush` (32)
            assert body + buf + min(100, p.sink) == 100 and p.buffer <= buf < p.buffer + qs[0].flush
            codes = [b.k for b in qs[0].blocks]
            assert sum(c.shape[2] for c in codes) == body and all(c.shape[3] == D * p.k // 8 for c in codes)
            assert all(b.v_lo.shape[3] == D // min(p.vgroup, D) for b in qs[0].blocks)
        n_out = sum(0 if b.out_idx is None else b.out_idx.numel() for s in qs for b in s.blocks)
        expected = (2 * R * (min(100, p.sink) + buf) * D * 2                                   # 16-bit sink + buffer
                    + R * body * D * (p.k + p.v) // 8                                          # packed codes
                    + 2 * R * body * (D // min(p.vgroup, D)) * 2                                 # value lo, span fp16
                    + n_out * (4 + 2)                                                            # outliers
                    + 2 * S * (min(100, p.sink) + min(p.recent, 100 - p.sink)) * D * 2)
        assert sum(t.numel() * t.element_size() for st in layer.stores for t in st.tensors()) == expected
        held += expected + sum(st.constants_nbytes() for st in qs)
    assert cache.nbytes() == held
    assert cache.full_nbytes(torch.float16) == 2 * 3 * 2 * 100 * D * 2      # (at 100 tokens the 32-token flush groups and
    #                                                                       constants can outweigh the savings)


def test_outliers_are_kept_exactly(tiny_with_profile):
    model, prof = tiny_with_profile
    ids = needle_sample(T=80, seed=9).input_ids.view(1, -1)
    cache = CompressedCache(model, prof, "heads=all,k=2,v=16,outliers=on,kclip=0.99,sink=0,buffer=0")
    prefill(model, ids, cache, chunk=80)
    (store,) = cache.layers[1].stores
    exact = torch.cat([store.block_keys(b) for b in store.blocks], 2)       # [1, H, 80, D]
    q = store.key.quantizer
    clamp = q.dequantize(q.quantize(exact))
    t = q.normalise(exact)
    outside = (t < -1e-5) | (t > 1 + 1e-5)                    # (the read decodes codes arithmetically: float noise)
    assert outside.any() and sum(b.out_idx.numel() for b in store.blocks) == int(outside.sum())
    # elements inside the range read back as the plain quantized value; the outliers did not (they are exact)
    assert torch.all((exact - clamp).abs()[~outside] < 1e-5)
    assert torch.all((exact - clamp).abs()[outside] > 0)


def test_quantized_cache_inside_generate_tracks_positions(tiny_with_profile):
    """8-bit keys and values are close to lossless: greedy generate gives the same tokens as the full cache, and
    get_seq_length() counts tokens seen while the store holds fewer 16-bit tokens."""
    model, prof = tiny_with_profile
    ids = needle_sample(T=60, seed=4).input_ids.view(1, -1)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = CompressedCache(model, prof, "heads=all,k=8,v=8,sink=4,buffer=8")
        got = model.generate(ids, max_new_tokens=12, do_sample=False, **with_cache(model, cache))
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == 60 + 11
    assert all(layer.stores[0].n_body + layer.stores[0].buf_k.shape[2] == 71 - 4 for layer in cache.layers)
    assert all(8 <= layer.stores[0].buf_k.shape[2] < 8 + 32 for layer in cache.layers)


def test_unpadded_batch_equals_rows_and_padded_batch_is_refused(tiny_with_profile):
    model, prof = tiny_with_profile
    rows = torch.stack([needle_sample(T=50, seed=s).input_ids for s in (1, 2)])      # [2, 50]
    policy = "heads=random:0.5:1,k=4,v=4,sink=4,recent=8,buffer=8"
    with torch.no_grad():
        both = model(rows, **with_cache(model, CompressedCache(model, prof, policy)), use_cache=True).logits
        for i in range(2):
            one = model(rows[i:i + 1], **with_cache(model, CompressedCache(model, prof, policy)), use_cache=True).logits
            torch.testing.assert_close(both[i:i + 1], one, atol=1e-4, rtol=0)
        mask = torch.ones_like(rows)
        mask[0, :3] = 0
        with pytest.raises(KvtoolError, match="padded batches"):
            model(rows, attention_mask=mask, **with_cache(model, CompressedCache(model, prof, policy)), use_cache=True)


def test_quantization_needs_a_profile_and_matching_codebooks(tiny_with_profile):
    model, prof = tiny_with_profile
    with pytest.raises(KvtoolError, match="give a profile"):
        CompressedCache(model, None, "k=4")
    with pytest.raises(KvtoolError, match="no quant.key_post.levels4"):
        CompressedCache(model, prof, "k=4,codebook=kmeans")
    with pytest.raises(KvtoolError, match="vgroup=5 does not divide"):
        CompressedCache(model, prof, "v=4,vgroup=5")


def test_cupy_backend_is_refused_clearly_without_a_gpu(tiny_with_profile):
    import cupy_kernels

    model, prof = tiny_with_profile
    if cupy_kernels.available():
        pytest.skip("a CUDA GPU with CuPy is present")
    with pytest.raises(KvtoolError, match="backend 'cupy' needs CuPy"):
        CompressedCache(model, prof, "k=4,v=4", backend="cupy")
    assert CompressedCache(model, prof, "k=4,v=4", backend="auto").backend == "torch"
