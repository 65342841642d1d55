"""Torch reference twins of the CUDA kernels (the `torch` backend). Run on CPU and GPU alike.

They reuse kvtool.quant for every quantization step (so the storage format has one definition) and compute
attention the plain way: dequantize the body to fp32, concatenate sink | body | buffer, softmax(q k^T * scale) v in
fp32. Readable and exact, not fast: the fp32 copy of K and V is what the fused kernel avoids.
"""

from __future__ import annotations

import torch

from kvtool import quant


def _levels(levels: torch.Tensor | None, bits: int, device) -> torch.Tensor:
    return (quant.uniform_levels(bits) if levels is None else levels).to(device)


def quantize_keys(x: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, levels: torch.Tensor | None,
                  bits: int) -> torch.Tensor:
    """x [B, H, T, D] → packed uint8 [B, H, T, D*bits/8] (per-channel ranges lo/span [H, D])."""
    q = quant.ChannelQuantizer(lo.float(), span.float(), bits, _levels(levels, bits, x.device))
    return q.quantize(x)


def quantize_values(x: torch.Tensor, levels: torch.Tensor | None, bits: int, group: int):
    """x [B, H, T, D] → (packed uint8 [B, H, T, D*bits/8], lo fp16 [B, H, T, D/group], span fp16)."""
    return quant.quantize_tokens(x, bits, group, None if levels is None else levels.to(x.device))


def dequantize_keys(codes, lo, span, levels, bits) -> torch.Tensor:
    """Packed keys [B, H, T, D*bits/8] → fp32 [B, H, T, D]."""
    q = quant.ChannelQuantizer(lo.float(), span.float(), bits, _levels(levels, bits, codes.device))
    return q.dequantize(codes)


def dequantize_values(codes, lo, span, levels, bits) -> torch.Tensor:
    """Packed values [B, H, T, D*bits/8] + fp16 lo/span [B, H, T, D/group] → fp32 [B, H, T, D]."""
    return quant.dequantize_tokens(codes, lo, span, bits, _levels(levels, bits, codes.device))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step, every stored token visible. q [B, H*G, D]; k, v [B, H, N, D] → [B, H*G, D] in q.dtype.
    Query heads h*G .. h*G+G-1 read KV head h; softmax in fp32."""
    b, hq, d = q.shape
    h = k.shape[1]
    qf = q.float().reshape(b, h, hq // h, d)                                     # [B, H, G, D]
    s = torch.einsum("bhgd,bhnd->bhgn", qf, k.float()) * scale                  # [B, H, G, N]
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgn,bhnd->bhgd", p, v.float())                           # [B, H, G, D]
    return o.reshape(b, hq, d).to(q.dtype)


def _nonempty(t) -> bool:
    return t is not None and t.shape[2] > 0


def decode_attention(q, k_sink, v_sink, k_codes, k_lo, k_span, k_levels, k_bits, v_codes, v_lo, v_span, v_levels,
                     v_bits, k_buf, v_buf, scale, split=None) -> torch.Tensor:
    """Retrieval heads: attention over sink (16-bit) | quantized body | recent buffer (16-bit), in that order.
    `split` only matters to the CUDA kernel (how the sequence is chunked) and is ignored here."""
    ks, vs = [], []
    if _nonempty(k_sink):
        ks.append(k_sink.float())
        vs.append(v_sink.float())
    if _nonempty(k_codes):
        ks.append(dequantize_keys(k_codes, k_lo, k_span, k_levels, k_bits))
        vs.append(dequantize_values(v_codes, v_lo, v_span, v_levels, v_bits))
    if _nonempty(k_buf):
        ks.append(k_buf.float())
        vs.append(v_buf.float())
    return attend(q, torch.cat(ks, 2), torch.cat(vs, 2), scale)


def window_attention(q, k, v, scale) -> torch.Tensor:
    """Streaming heads: attention over the 16-bit window k, v [B, H, W, D] (sink + recent, all visible)."""
    return attend(q, k, v, scale)
