"""CuPy launchers for the compressed-KV CUDA kernels (quantize + pack, fused split-K decode attention, merge).

The CUDA C++ in kvtool_kernels.cu (next to this file) is compiled at run time by NVRTC through `cupy.RawModule`, one template instantiation per
configuration (cached in memory here and on disk by CuPy under ~/.cupy/kernel_cache). CuPy is imported inside the
functions only, so importing this module never needs it. Tensors stay torch tensors: kernels receive their device
pointers (`tensor.data_ptr()`, the same address `__cuda_array_interface__` / DLPack would hand over, zero-copy; CuPy
has no bfloat16 dtype, so raw pointers are the one path that covers fp16 and bf16 alike), outputs are allocated with
torch, and every launch goes on torch's current CUDA stream (`cupy.cuda.ExternalStream`), so kernels order with the
surrounding torch work without any synchronisation.

Storage format: see kvtool/quant.py and docs/kernels.md. Shapes in comments: B batch, H KV heads, G query heads per
KV head, D head_dim, S sink tokens, T quantized body tokens, R recent-buffer tokens.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch

from kvtool.errors import KvtoolError

NT_ATTN = 128          # threads per CTA of the attention kernel (KV_NT in the CUDA source)
NT_QUANT = 256         # threads per CTA of the quantize kernels
MAX_CHUNKS = 1024      # sequence chunks per (batch, query head); the merge kernel keeps one weight per chunk in smem
MAX_G_CTA = 8          # query heads served by one CTA (more heads per KV head → several CTAs per KV head)
HEAD_DIMS = (32, 64, 128, 256)

SOURCE = (Path(__file__).with_name("kvtool_kernels.cu")).read_text(encoding="utf-8")   # the CUDA C++ (NVRTC)


# ------------------------------------------------------------------------------------------------------------ planning
def tile_tokens(head_dim: int, k_bits: int, v_bits: int, group: int) -> int:
    """Tokens per tile of the attention kernel (kv_tile in the CUDA source)."""
    per_token = head_dim * k_bits // 8 + head_dim * v_bits // 8 + 4 * (head_dim // group)
    return 64 if per_token <= 160 else 32 if per_token <= 320 else 16


def slice_width(g_cta: int, head_dim: int) -> int:
    """Channels per thread (CPT): the thread keeps G*CPT query values and G*CPT accumulators in registers, so fewer
    channels for more heads; at most 32 threads per row (D / CPT <= 32)."""
    cpt = 32 if g_cta <= 2 else 16 if g_cta <= 4 else 8
    cpt = min(cpt, head_dim)
    while head_dim // cpt > 32:
        cpt *= 2
    return cpt


def heads_per_cta(g: int) -> int:
    """Largest divisor of the GQA ratio that is <= MAX_G_CTA (query heads one CTA serves)."""
    return max(d for d in range(1, min(g, MAX_G_CTA) + 1) if g % d == 0)


@dataclass(frozen=True)
class DecodePlan:
    """How one decode_attention call is cut into CTAs (see docs/kernels.md)."""
    g_cta: int           # query heads per CTA
    cpt: int             # channels per thread
    tile: int            # tokens per tile
    chunk_plain: int     # tokens per chunk of the 16-bit segments
    chunk_body: int      # tokens per chunk of the quantized body
    n_sink: int
    n_body: int
    n_buf: int

    @property
    def n_chunks(self) -> int:
        return self.n_sink + self.n_body + self.n_buf


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)              # called per layer and decode step with few distinct shapes
def plan_decode(batch: int, kv_heads: int, group_size: int, head_dim: int, sink: int, body: int, buffer: int,
                k_bits: int = 4, v_bits: int = 4, v_group: int | None = None, split: int | None = None,
                sms: int = 132) -> DecodePlan:
    """Chunking of the sequence: `split` = chunks of the quantized body per (batch, KV head); None = enough CTAs for
    about 4 waves over `sms` multiprocessors, at least 256 tokens per chunk. Chunks are whole tiles."""
    g_cta = heads_per_cta(group_size)
    cpt = slice_width(g_cta, head_dim)
    v_group = head_dim if v_group is None else v_group
    tile = tile_tokens(head_dim, k_bits, v_bits, v_group)
    ctas_per_chunk = batch * kv_heads * (group_size // g_cta)
    want = max(1, _ceil(4 * sms, max(1, ctas_per_chunk)))             # chunks per head for ~4 waves
    longest_plain = max(sink, buffer)
    chunk_plain = max(256, _ceil(longest_plain, want)) if longest_plain else 256
    if body == 0:
        chunk_body = tile
    elif split is None:
        chunk_body = max(256, _ceil(body, want))
    else:
        if int(split) < 1:
            raise KvtoolError(f"split must be a positive number of chunks (got {split})")
        chunk_body = _ceil(body, int(split))
    chunk_plain, chunk_body = _ceil(chunk_plain, tile) * tile, _ceil(chunk_body, tile) * tile

    def counts():
        return _ceil(sink, chunk_plain), _ceil(body, chunk_body), _ceil(buffer, chunk_plain)

    while sum(counts()) > MAX_CHUNKS:                                   # only with a tiny explicit split
        chunk_plain, chunk_body = chunk_plain * 2, chunk_body * 2
    n_sink, n_body, n_buf = counts()
    return DecodePlan(g_cta, cpt, tile, chunk_plain, chunk_body, n_sink, n_body, n_buf)


# ------------------------------------------------------------------------------------------------------------ launching
_KERNELS: dict = {}
_STREAMS: dict = {}
_SMS: dict = {}


def _get_kernel(name: str, device: torch.device):
    """The compiled kernel `name` (a template instantiation, e.g. 'kv_quantize_keys<1,4>') for `device`."""
    key = (name, device.index)
    kernel = _KERNELS.get(key)
    if kernel is None:
        import cupy

        with cupy.cuda.Device(device.index):
            module = cupy.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=(name,))
            kernel = _KERNELS[key] = module.get_function(name)
    return kernel


def _launch(name: str, grid: tuple, block: tuple, args: tuple, device: torch.device) -> None:
    """Launch on torch's current stream of `device` (ordered with the torch ops around it; no synchronisation)."""
    import cupy

    kernel = _get_kernel(name, device)
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = _STREAMS.get((device.index, ptr))
    if stream is None:
        stream = _STREAMS[(device.index, ptr)] = cupy.cuda.ExternalStream(ptr, device.index)
    with cupy.cuda.Device(device.index):
        kernel(grid, block, args, stream=stream)


def _num_sms(device: torch.device) -> int:
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


# Kernel arguments: every pointer is passed as a 64-bit integer, every integer as int64 (the kernels declare i64),
# every float as float32 — the driver copies sizeof(parameter) bytes from each, so these must match exactly.
def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None or t.numel() == 0 else t.data_ptr())


def _i(x: int) -> np.int64:
    return np.int64(int(x))


def _f(x: float) -> np.float32:
    return np.float32(x)


def _aligned(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % 16 == 0


def _contiguous16(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a 16-byte-aligned base pointer."""
    t = t.contiguous()
    return t if _aligned(t) else t.clone()


def _rows(t: torch.Tensor | None, width: int, align_rows: bool):
    """[B, H, N, width] → (tensor, batch stride, head stride) in elements, with each (b, h) head's rows contiguous
    (stride (width, 1)) and a 16-byte-aligned base; with align_rows also every row start 16-byte aligned (the 16-bit
    loads). Copies only when the layout does not already qualify (e.g. a slice of a preallocated cache does)."""
    if t is None or t.numel() == 0:
        return None, 0, 0

    def strides(x):
        return [0 if x.shape[i] == 1 else x.stride(i) for i in (0, 1)]

    def ok(x):
        if x.stride(3) != 1 or (x.shape[2] > 1 and x.stride(2) != width) or not _aligned(x):
            return False
        return not align_rows or all(s * x.element_size() % 16 == 0 for s in strides(x))

    if not ok(t):
        t = _contiguous16(t)
    sb, sh = strides(t)
    return t, sb, sh


def _pair(a, b, width, align_rows):
    """Two tensors that must share strides (K and V of one segment, or V lo and V span)."""
    a2, sa_b, sa_h = _rows(a, width, align_rows)
    b2, sb_b, sb_h = _rows(b, width, align_rows)
    if a2 is not None and (sa_b, sa_h) != (sb_b, sb_h):
        a2, sa_b, sa_h = _rows(_contiguous16(a), width, align_rows)
        b2, sb_b, sb_h = _rows(_contiguous16(b), width, align_rows)
    return a2, b2, sa_b, sa_h


def _xt(x: torch.Tensor):
    """(tensor, XT code) for the quantize kernels: fp32 0, fp16 1, bf16 2 (anything else goes through fp32)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return _contiguous16(x), {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]


def _mids(levels: torch.Tensor | None, bits: int, device):
    """Decision midpoints exactly as kvtool.quant.encode computes them → (fp32 [.., 2^b - 1], head stride)."""
    from kvtool.quant import uniform_levels

    lv = (uniform_levels(bits) if levels is None else levels).to(device)
    mid = ((lv[..., 1:] + lv[..., :-1]) / 2).to(torch.float32).contiguous()
    return mid, (mid.shape[-1] if mid.dim() == 2 else 0)


def is_uniform(levels: torch.Tensor | None, bits: int) -> bool:
    """True when `levels` is (up to 1e-6) linspace(0, 1, 2^bits) for every head: the kernels then compute levels as
    code / (2^bits - 1) instead of looking them up. Cached on the tensor (one device sync per codebook tensor)."""
    if levels is None:
        return True
    tag = getattr(levels, "_kvtool_uniform", None)
    if tag is not None and tag[0] == levels._version and tag[1] == bits:
        return tag[2]
    from kvtool.quant import uniform_levels

    lv = levels.detach().float().cpu()
    flag = lv.shape[-1] == 2 ** bits and bool((lv - uniform_levels(bits)).abs().max() <= 1e-6)
    try:
        levels._kvtool_uniform = (levels._version, bits, flag)
    except Exception:  # noqa: BLE001 - caching is optional
        pass
    return flag


# ------------------------------------------------------------------------------------------------------------ kernels
def quantize_keys(x, lo, span, levels, bits):
    """x [B, H, T, D] (CUDA) → packed uint8 [B, H, T, D*bits/8]; see kv_quantize_keys."""
    b, h, t, d = x.shape
    out = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    n = b * h * t * d // 8
    if n == 0:
        return out
    x, xt = _xt(x)
    lo32, span32 = _contiguous16(lo.float()), _contiguous16(span.float())
    mids, hs = _mids(levels, bits, x.device)
    _launch(f"kv_quantize_keys<{xt},{bits}>", (_ceil(n, NT_QUANT),), (NT_QUANT,),
            (_ptr(x), _i(n), _i(d), _i(h), _i(t), _ptr(lo32), _ptr(span32), _ptr(mids), _i(hs), _ptr(out)), x.device)
    return out


def quantize_values(x, levels, bits, group):
    """x [B, H, T, D] (CUDA) → (packed uint8 [B, H, T, D*bits/8], lo fp16 [B, H, T, D/group], span fp16)."""
    b, h, t, d = x.shape
    if group % 8 or group > 256 or group & (group - 1):
        raise KvtoolError(f"the cupy value quantizer needs a power-of-two group in [8, 256] (got {group})")
    out = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    lo = torch.empty(b, h, t, d // group, dtype=torch.float16, device=x.device)
    span = torch.empty_like(lo)
    n = b * h * t * d // 8
    if n == 0:
        return out, lo, span
    x, xt = _xt(x)
    mids, hs = _mids(levels, bits, x.device)
    _launch(f"kv_quantize_values<{xt},{bits},{group}>", (_ceil(n, NT_QUANT),), (NT_QUANT,),
            (_ptr(x), _i(n), _i(d), _i(h), _i(t), _ptr(mids), _i(hs), _ptr(out), _ptr(lo), _ptr(span)), x.device)
    return out, lo, span


def decode_attention(q, k_sink, v_sink, k_codes, k_lo, k_span, k_levels, k_bits, v_codes, v_lo, v_span, v_levels,
                     v_bits, k_buf, v_buf, scale, split=None):
    """Fused split-K decode attention (kv_decode_split + kv_decode_merge) → [B, H*G, D] in q.dtype.
    Arguments as cupy_kernels.decode_attention (already validated there); empty segments may be None."""
    device = q.device
    bsz, hq, d = q.shape
    if d not in HEAD_DIMS:
        raise KvtoolError(f"the cupy decode kernel supports head_dim {'/'.join(map(str, HEAD_DIMS))} (got {d}); "
                          "use backend='torch'")
    n_of = lambda t: 0 if t is None else t.shape[2]                                    # noqa: E731
    s_len, t_len, r_len = n_of(k_sink), n_of(k_codes), n_of(k_buf)
    h = next(t.shape[1] for t in (k_sink, k_codes, k_buf) if t is not None and t.shape[2] > 0)
    g = hq // h
    for t in (k_sink, v_sink, k_buf, v_buf):
        if t is not None and t.numel() and t.dtype not in (torch.float16, torch.bfloat16):
            raise KvtoolError(f"the cupy decode kernel reads 16-bit sink/buffer tensors (got {t.dtype})")
    dtypes = {t.dtype for t in (k_sink, v_sink, k_buf, v_buf) if t is not None and t.numel()}
    if len(dtypes) > 1:
        raise KvtoolError("sink and buffer tensors must share one 16-bit dtype")
    bf16 = dtypes == {torch.bfloat16}

    if t_len:
        group = d // v_lo.shape[-1]
        if group % 8 or group & (group - 1):
            raise KvtoolError(f"the cupy decode kernel needs a power-of-two value group >= 8 (got {group})")
        kb, vb = k_bits, v_bits
        kuni, vuni = is_uniform(k_levels, kb), is_uniform(v_levels, vb)
        k_lev = None if kuni else _contiguous16(k_levels.float())
        v_lev = None if vuni else _contiguous16(v_levels.float())
        k_lev_hs = 0 if kuni or k_lev.dim() == 1 else k_lev.shape[-1]
        v_lev_hs = 0 if vuni or v_lev.dim() == 1 else v_lev.shape[-1]
        klo, ksp = _contiguous16(k_lo.float()), _contiguous16(k_span.float())
        kc, kc_sb, kc_sh = _rows(k_codes, d * kb // 8, align_rows=False)
        vc, vc_sb, vc_sh = _rows(v_codes, d * vb // 8, align_rows=False)
        if v_lo.dtype != torch.float16 or v_span.dtype != torch.float16:
            raise KvtoolError("value scales (v_lo, v_span) must be float16")
        vlo, vsp, vs_sb, vs_sh = _pair(v_lo, v_span, d // group, align_rows=False)
    else:                                   # no body: fixed dummy configuration (one compiled variant per D and G)
        group, kb, vb, kuni, vuni = d, 4, 4, True, True
        k_lev = v_lev = klo = ksp = kc = vc = vlo = vsp = None
        k_lev_hs = v_lev_hs = kc_sb = kc_sh = vc_sb = vc_sh = vs_sb = vs_sh = 0
    ks, vs, sink_sb, sink_sh = _pair(k_sink, v_sink, d, align_rows=True)
    kbf, vbf, buf_sb, buf_sh = _pair(k_buf, v_buf, d, align_rows=True)

    plan = plan_decode(bsz, h, g, d, s_len, t_len, r_len, kb, vb, group, split, _num_sms(device))
    qf = _contiguous16(q.float())
    part_o = torch.empty(bsz * hq * plan.n_chunks * d, dtype=torch.float32, device=device)
    part_ml = torch.empty(bsz * hq * plan.n_chunks * 2, dtype=torch.float32, device=device)
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=device)
    name = (f"kv_decode_split<{str(bf16).lower()},{d},{plan.g_cta},{plan.cpt},{kb},{vb},{group},"
            f"{str(kuni).lower()},{str(vuni).lower()}>")
    args = (_ptr(qf),
            _ptr(ks), _ptr(vs), _i(sink_sb), _i(sink_sh), _i(s_len),
            _ptr(kc), _i(kc_sb), _i(kc_sh),
            _ptr(vc), _i(vc_sb), _i(vc_sh),
            _ptr(klo), _ptr(ksp), _ptr(k_lev), _i(k_lev_hs),
            _ptr(vlo), _ptr(vsp), _i(vs_sb), _i(vs_sh),
            _ptr(v_lev), _i(v_lev_hs),
            _i(t_len),
            _ptr(kbf), _ptr(vbf), _i(buf_sb), _i(buf_sh), _i(r_len),
            _i(h), _i(g), _f(scale * math.log2(math.e)),
            _i(plan.chunk_plain), _i(plan.chunk_body), _i(plan.n_sink), _i(plan.n_body), _i(plan.n_chunks),
            _ptr(part_o), _ptr(part_ml))
    _launch(name, (plan.n_chunks, h, bsz * (g // plan.g_cta)), (NT_ATTN,), args, device)
    _launch("kv_decode_merge", (bsz * hq,), (128,),
            (_ptr(part_o), _ptr(part_ml), _i(plan.n_chunks), _i(d), _ptr(out)), device)
    return out.to(q.dtype)


def window_attention(q, k, v, scale):
    """Streaming heads: every query attends to the whole 16-bit window k/v [B, H, W, D] (the same kernel with only
    its 16-bit segment)."""
    return decode_attention(q, k, v, None, None, None, None, 4, None, None, None, None, 4, None, None, scale)
