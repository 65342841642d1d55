"""CuPy GPU kernels for the compressed KV cache, each with a torch reference twin (the `torch` backend).

    from cupy_kernels import quantize_keys, quantize_values, decode_attention, window_attention, select_backend
    backend = select_backend("auto", device=q.device)          # "cupy" on a CUDA device with CuPy, else "torch"
    out = decode_attention(q, k_sink, v_sink, k_codes, k_lo, k_span, k_levels, 4, v_codes, v_lo, v_span, v_levels,
                           4, k_buf, v_buf, scale, backend=backend)

Kernels (cupy_kernels/kernels.py, CUDA C++ compiled by NVRTC through CuPy): quantize + pack keys (per channel,
calibrated ranges, codebook search) and values (per token group min/max), fused split-K decode attention that reads
packed codes + scales + 16-bit sink/buffer directly (GQA-aware), a log-sum-exp merge, and window attention for
streaming heads. Formats: kvtool/quant.py; details, error bounds and how to run the GPU checks: docs/kernels.md.
Importing this package never imports CuPy.
"""

from __future__ import annotations

import math

import torch

from kvtool.errors import KvtoolError

from . import reference

BACKENDS = ("auto", "torch", "cupy")

__all__ = ["available", "select_backend", "quantize_keys", "quantize_values", "decode_attention",
           "window_attention", "BACKENDS"]


def available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def select_backend(name: str = "auto", device=None) -> str:
    """The backend to use, "torch" or "cupy". `auto`: cupy when `device` is a CUDA device and CuPy works, else
    torch. An explicit "cupy" that cannot run (no CuPy, no CUDA device, or CPU tensors) raises KvtoolError."""
    if name not in BACKENDS:
        raise KvtoolError(f"unknown kernel backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name == "torch":
        return "torch"
    dev = None if device is None else torch.device(device)
    on_cuda = dev is not None and dev.type == "cuda"
    if name == "auto":
        return "cupy" if on_cuda and available() else "torch"
    if not available():
        raise KvtoolError("backend 'cupy' needs CuPy and a CUDA GPU (pip install kvtool[gpu]); "
                          "use backend='torch' on this machine")
    if dev is not None and not on_cuda:
        raise KvtoolError(f"backend 'cupy' needs CUDA tensors (these are on {dev}); use backend='torch'")
    return "cupy"


def _impl(backend: str, device):
    if select_backend(backend, device) == "cupy":
        from . import kernels

        return kernels
    return reference


def _check_bits(bits: int, what: str) -> None:
    from kvtool.quant import BITS

    if bits not in BITS:
        raise KvtoolError(f"{what}: bits must be one of {BITS} (got {bits})")


def _check_levels(levels, bits: int, heads: int, what: str) -> None:
    """A codebook is None (uniform), [2^bits] (shared) or [H, 2^bits] (one per KV head)."""
    if levels is None:
        return
    n = 2 ** bits
    if tuple(levels.shape) not in ((n,), (heads, n)):
        raise KvtoolError(f"{what} codebook must be [{n}] or [H, {n}] = [{heads}, {n}] for {bits}-bit codes "
                          f"(got {list(levels.shape)})")


def _check_4d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise KvtoolError(f"{what} must be [B, H, T, D] (got shape {tuple(x.shape)})")
    if x.shape[-1] % 8:
        raise KvtoolError(f"{what}: head_dim {x.shape[-1]} is not a multiple of 8")


def quantize_keys(x: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, levels: torch.Tensor | None, bits: int,
                  backend: str = "torch") -> torch.Tensor:
    """Keys x [B, H, T, D] (any float dtype) → packed uint8 [B, H, T, D*bits/8], per channel with the calibrated
    ranges lo, span [H, D] and codebook `levels` ([2^bits] or [H, 2^bits] in [0, 1], None = uniform)."""
    _check_4d(x, "keys")
    _check_bits(bits, "quantize_keys")
    if tuple(lo.shape) != (x.shape[1], x.shape[3]) or lo.shape != span.shape:
        raise KvtoolError(f"key ranges must be [H, D] = {[x.shape[1], x.shape[3]]} (got {list(lo.shape)}, "
                          f"{list(span.shape)})")
    _check_levels(levels, bits, x.shape[1], "key")
    return _impl(backend, x.device).quantize_keys(x, lo, span, levels, bits)


def quantize_values(x: torch.Tensor, levels: torch.Tensor | None, bits: int, group: int, backend: str = "torch"):
    """Values x [B, H, T, D] → (packed uint8 [B, H, T, D*bits/8], lo fp16 [B, H, T, D/group], span fp16): per token,
    groups of `group` channels, lo = group min, span = max - min."""
    _check_4d(x, "values")
    _check_bits(bits, "quantize_values")
    if group < 1 or x.shape[-1] % group:
        raise KvtoolError(f"value group {group} does not divide head_dim {x.shape[-1]}")
    _check_levels(levels, bits, x.shape[1], "value")
    return _impl(backend, x.device).quantize_values(x, levels, bits, group)


def _len(t) -> int:
    return 0 if t is None else t.shape[2]


def _check_decode(q, k_sink, v_sink, k_codes, k_lo, k_span, k_bits, v_codes, v_lo, v_span, v_bits, k_buf, v_buf,
                  k_levels=None, v_levels=None):
    if q.dim() != 3:
        raise KvtoolError(f"decode query must be [B, H*G, D] (one step; got shape {tuple(q.shape)})")
    b, hq, d = q.shape
    present = [t for t in (k_sink, k_codes, k_buf) if t is not None and t.shape[2] > 0]
    if not present:
        raise KvtoolError("decode attention needs at least one stored token (sink, body and buffer are all empty)")
    h = present[0].shape[1]
    if hq % h:
        raise KvtoolError(f"{hq} query heads are not a multiple of {h} KV heads")
    for name, k, v in (("sink", k_sink, v_sink), ("buffer", k_buf, v_buf)):
        if _len(k):
            if v is None or tuple(k.shape) != (b, h, k.shape[2], d) or k.shape != v.shape:
                shapes = [None if x is None else list(x.shape) for x in (k, v)]
                raise KvtoolError(f"{name} keys/values must both be [B, H, N, D] = [{b}, {h}, N, {d}] (got "
                                  f"{shapes[0]}, {shapes[1]})")
    if _len(k_codes):
        _check_bits(k_bits, "key codes")
        _check_bits(v_bits, "value codes")
        t = k_codes.shape[2]
        if tuple(k_codes.shape) != (b, h, t, d * k_bits // 8) or k_codes.dtype != torch.uint8:
            raise KvtoolError(f"key codes must be uint8 [B, H, T, D*bits/8] = [{b}, {h}, {t}, {d * k_bits // 8}] "
                              f"(got {k_codes.dtype} {list(k_codes.shape)})")
        if v_codes is None or tuple(v_codes.shape) != (b, h, t, d * v_bits // 8) or v_codes.dtype != torch.uint8:
            raise KvtoolError(f"value codes must be uint8 [B, H, T, D*bits/8] = [{b}, {h}, {t}, {d * v_bits // 8}]")
        if tuple(k_lo.shape) != (h, d) or tuple(k_span.shape) != (h, d):
            raise KvtoolError(f"key ranges must be [H, D] = [{h}, {d}] (got {list(k_lo.shape)}, {list(k_span.shape)})")
        if v_lo is None or v_lo.shape != v_span.shape or tuple(v_lo.shape[:3]) != (b, h, t) or d % v_lo.shape[3]:
            raise KvtoolError(f"value scales must be [B, H, T, D/group] with T = {t} "
                              f"(got {None if v_lo is None else list(v_lo.shape)})")
        _check_levels(k_levels, k_bits, h, "key")
        _check_levels(v_levels, v_bits, h, "value")


def decode_attention(q, k_sink, v_sink, k_codes, k_lo, k_span, k_levels, k_bits, v_codes, v_lo, v_span, v_levels,
                     v_bits, k_buf, v_buf, scale, backend: str = "torch", split: int | None = None) -> torch.Tensor:
    """One decode step of the retrieval heads over sink | quantized body | recent buffer → [B, H*G, D] in q.dtype.

    q [B, H*G, D]; k_sink/v_sink [B, H, S, D] 16-bit; k_codes/v_codes [B, H, T, D*bits/8] uint8; k_lo/k_span [H, D]
    fp32; k_levels/v_levels [2^b] or [H, 2^b] (None = uniform); v_lo/v_span [B, H, T, D/group] fp16; k_buf/v_buf
    [B, H, R, D] 16-bit. Any of the three segments may be empty (0 tokens, or None). Every query sees every token.
    `scale` None = 1/sqrt(D). `split`: chunks of the body per (batch, KV head) for the cupy kernel (None = auto)."""
    _check_decode(q, k_sink, v_sink, k_codes, k_lo, k_span, k_bits, v_codes, v_lo, v_span, v_bits, k_buf, v_buf,
                  k_levels, v_levels)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _impl(backend, q.device).decode_attention(
        q, k_sink, v_sink, k_codes, k_lo, k_span, k_levels, k_bits, v_codes, v_lo, v_span, v_levels, v_bits,
        k_buf, v_buf, scale, split=split)


def window_attention(q, k, v, scale, backend: str = "torch") -> torch.Tensor:
    """One decode step of the streaming heads over their 16-bit window k, v [B, H, W, D] → [B, H*G, D]."""
    _check_decode(q, k, v, None, None, None, 4, None, None, None, 4, None, None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _impl(backend, q.device).window_attention(q, k, v, scale)
