"""The quantized store: every token of its heads, as 16-bit sink | quantized body | 16-bit recent buffer, for keys and
values (the retrieval heads of DuoAttention arXiv 2410.10819 keep the whole context; here they keep it quantized).

- Keys are quantized per channel with static ranges calibrated offline, optionally before RoPE (RoPE is undone
  before quantizing and redone on read), with optional sparse exact outliers and k-means codebooks (KVQuant, Hooper
  et al., arXiv 2401.18079). Static ranges let a key be quantized the moment it leaves the buffer.
- Values are quantized per token in groups of `vgroup` channels (KIVI, Liu et al., arXiv 2402.02750).
- The first `sink` tokens stay in 16 bits (attention sinks, as KVQuant keeps them); the last `buffer` tokens stay in
  16 bits (KIVI's residual). Tokens leave the buffer in groups of `flush` (32 in the cache: between `buffer` and
  `buffer + 31` tokens are 16-bit), so a decode step does not pay the quantizer's fixed cost for one token; with
  k = v = 16 nothing is quantized and every token stays in the buffer.

The body lives in blocks of at most `block` tokens (packed codes, value scales, outliers per block), so appending
copies at most one block, and `attend` reads the body block by block: each block gives a partial softmax with its
log-sum-exp, merged at the end (the split-K merge of cupy_kernels' fused kernel), so the body is never dequantized
whole: only one block's keys exist in float at a time. A decode step (one query after every held token) takes a
single softmax over every block's scores, the 16-bit parts and the new token (`_decode_step`) instead of merging a
partial per part. With uniform levels the codes are unpacked by byte shifts;
keys are decoded by one addcmul (lo + span/(2^b − 1)·code per channel, then RoPE for pre-RoPE keys), and at a decode
step values are not decoded at all: with per-token group ranges, Σ_n p_n (lo_n + span_n·t_n) = p·lo + (p⊙span)·t per
group. k-means codebooks decode keys with one gather from a byte → (8/bits values) table of lo + span·level per
channel, and values through kvtool.quant.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import cupy_kernels
from kvtool import quant
from kvtool.kvstore import KeyFormat, ValueFormat
from kvtool.policy import CLIP_LEVELS, _bits, _choice, _clip, _count, register_field, simple
from kvtool.stores.base import (SixteenBitRollback, Store, append_sixteen_bit, attend_sixteen_bit, batch_rows,
                                cat_float, register, select_sixteen_bit, softcap_, tensor_bytes)

register_field(
    simple("k", lambda t: _bits("k", t), 16, "2, 3, 4, 8, 16 (`4bit` also works)",
           "Bits per key element of retrieval heads (16: not quantized).", "quantized"),
    simple("v", lambda t: _bits("v", t), 16, "2, 3, 4, 8, 16 (`4bit` also works)",
           "Bits per value element of retrieval heads (16: not quantized).", "quantized"),
    simple("buffer", lambda t: _count("buffer", t, 0), 128, "tokens",
           "Most recent tokens retrieval heads keep in 16 bits before quantizing them (they leave in groups of 32, "
           "so up to `buffer + 31` are 16-bit at a time).", "quantized"),
    simple("krope", lambda t: _choice("krope", t, ("post", "pre")), "post", "`post`, `pre`",
           "`pre` quantizes keys before RoPE (KVQuant): RoPE is undone with the model's own rotary table, then "
           "redone on read.", "quantized"),
    simple("kclip", _clip, 0.999, ", ".join(f"{c:g}" for c in CLIP_LEVELS),
           "Quantile of the calibrated per-channel key range. 1 means traced min..max.", "quantized"),
    simple("outliers", lambda t: _choice("outliers", t, ("on", "off")) == "on", False, "`on`, `off`",
           "`on` stores key elements outside the clipped range exactly (sparse: int32 index + float16 value). "
           "`off` clamps them.", "quantized"),
    simple("codebook", lambda t: _choice("codebook", t, ("uniform", "kmeans")), "uniform", "`uniform`, `kmeans`",
           "`kmeans` uses the levels learned by `kvtool calibrate --method kvquant`, which must have used the same "
           "`kclip` and `vgroup`.", "quantized"),
    simple("vgroup", lambda t: _count("vgroup", t, 1), 32, "channels", "Channels per value scale group, per token; must divide head_dim (refused otherwise). The default 32 becomes head_dim on heads narrower than 32.",
           "quantized"),
)

BLOCK = 4096                    # body tokens per block: on CPU the per-op overhead of small reads dominates up to a
                                # few thousand tokens (benchmarks/decode_cpu.py); still bounds a read's float scratch
FLUSH = 32                      # tokens leave the buffer in groups of this many (CompressedCache's stores)


@dataclass
class Block:
    """Consecutive body tokens start..start+n-1. k: packed codes [B, h, n, D·bits/8] uint8 (or [B, h, n, D] 16-bit
    when k=16); v likewise, with v_lo/v_span [B, h, n, D/group] float16; key outliers: int32 flat index into the
    token-major [n, B, h, D] block, float16 value."""
    start: int
    n: int
    k: torch.Tensor
    v: torch.Tensor
    v_lo: torch.Tensor | None = None
    v_span: torch.Tensor | None = None
    out_idx: torch.Tensor | None = None
    out_val: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.v_lo, self.v_span, self.out_idx, self.out_val) if t is not None]


def _select_block(blk: Block, idx: torch.Tensor, hd: int) -> None:
    """Keep batch rows idx [B'] of a body block; key outliers (flat indices into the token-major [n, B, h, D]
    block, hd = h·D) are re-addressed to the rows that now hold them (a row taken twice gets its outliers twice)."""
    b_old = blk.k.shape[0]
    blk.k, blk.v = batch_rows(blk.k, idx), batch_rows(blk.v, idx)
    blk.v_lo, blk.v_span = batch_rows(blk.v_lo, idx), batch_rows(blk.v_span, idx)
    if blk.out_idx is None:
        return
    e = blk.out_idx.long()
    tok, row, rest = e // (b_old * hd), (e // hd) % b_old, e % hd
    which, new_row = (row.view(-1, 1) == idx.to(e.device).view(1, -1)).nonzero(as_tuple=True)   # [E'] each
    flat = tok[which] * (len(idx) * hd) + new_row * hd + rest[which]
    order = flat.argsort()
    blk.out_idx, blk.out_val = flat[order].to(torch.int32), blk.out_val[which][order]


_BYTE_CODES: dict[int, torch.Tensor] = {}


def byte_codes(bits: int, device) -> torch.Tensor:
    """long [256, 8/bits]: the codes packed in each byte value, lowest bits first (kvtool.quant's layout)."""
    key = (bits, str(device))
    if key not in _BYTE_CODES:
        per = 8 // bits
        b = torch.arange(256, device=device).view(-1, 1)
        _BYTE_CODES[key] = (b >> (bits * torch.arange(per, device=device))) & (2 ** bits - 1)
    return _BYTE_CODES[key]


def key_table(quantizer: quant.ChannelQuantizer) -> torch.Tensor:
    """float32 [h · D/per · 256, per] with per = 8/bits: row (head, byte column j, byte value) holds the dequantized
    keys lo + span·level of the `per` channels j·per .. j·per+per-1 that byte encodes. Built per read (h·D·256
    floats), not held."""
    bits, lo, span, levels = quantizer.bits, quantizer.lo, quantizer.span, quantizer.levels
    h, d = lo.shape
    per = 8 // bits
    lv = levels[..., byte_codes(bits, lo.device)]                          # [256, per] or [h, 256, per]
    lv = lv.view(1, 256, per) if lv.dim() == 2 else lv
    lo = lo.view(h, d // per, 1, per)
    span = span.view(h, d // per, 1, per)
    return torch.addcmul(lo, span, lv.unsqueeze(1)).reshape(-1, per)      # [h·(D/per)·256, per]


def gather_bytes(codes: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """codes uint8 [B, h, n, nb] → float32 [B, h, n, nb·per]: one index_select of the rows `code + offset` of
    `table` (key_table: offsets [h, nb] pick the head and byte column; per-head codebooks: offsets [h, 1])."""
    b, h, n, nb = codes.shape
    idx = codes.long() if offsets is None else codes + offsets.view(1, h, 1, -1)
    return table.index_select(0, idx.view(-1)).view(b, h, n, nb * table.shape[1])


_OFFSETS: dict[tuple, torch.Tensor] = {}


def key_offsets(h: int, nb: int, device) -> torch.Tensor:
    """long [h, nb]: the first key_table row of each (head, byte column)."""
    key = (h, nb, str(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = (torch.arange(h * nb, device=device) * 256).view(h, nb)
    return _OFFSETS[key]


def unpack_float(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 [..., nb] (2, 4 or 8 bits) → the codes as float32 [..., nb·8/bits], by shifts on the bytes (no
    table): for uniform levels, level = code / (2^bits − 1), so lo + span·level is one addcmul away."""
    if bits == 8:
        return codes.float()
    per = 8 // bits
    if bits == 4 and sys.byteorder == "little":
        # byte c = lo + 16·hi → the int16 lo + 256·hi = c + 240·hi, whose two bytes are (lo, hi): the nibbles
        # interleaved by contiguous ops only (writing every other float of a buffer is several times slower)
        w = codes.to(torch.int16)
        w.add_(w >> 4, alpha=240)
        return w.view(torch.uint8).float()
    out = torch.empty(*codes.shape, per, dtype=torch.float32, device=codes.device)
    mask = 2 ** bits - 1
    torch.bitwise_and(codes, mask, out=out[..., 0])
    for i in range(1, per - 1):
        torch.bitwise_and(codes >> (bits * i), mask, out=out[..., i])
    torch.bitwise_right_shift(codes, bits * (per - 1), out=out[..., per - 1])
    return out.view(*codes.shape[:-1], codes.shape[-1] * per)


def uniform(levels: torch.Tensor | None, bits: int) -> bool:
    """True when `levels` is None or the evenly spaced levels of `bits` (so codes decode arithmetically)."""
    if levels is None:
        return True
    if levels.dim() != 1:
        return False
    return bool(torch.equal(levels.cpu(), quant.uniform_levels(bits)))


@register("quantized")
class QuantizedStore(SixteenBitRollback, Store):
    """sink_k/sink_v [B, h, s, D] and buf_k/buf_v [B, h, b, D] in `dtype`, body `blocks` (see Block)."""

    reads = ("sink", "buffer", "k", "v", "krope", "kclip", "outliers", "codebook", "vgroup", "dtype")

    def __init__(self, k_bits: int, v_bits: int, sink: int, buffer: int, dtype: torch.dtype,
                 key: KeyFormat | None = None, value: ValueFormat | None = None, backend: str = "torch",
                 block: int = BLOCK, flush: int = 1):
        self.k_bits, self.v_bits, self.n_sink, self.n_buffer, self.dtype = k_bits, v_bits, sink, buffer, dtype
        self.key, self.value, self.backend, self.block, self.flush = key, value, backend, block, flush
        self._k_uniform = k_bits in (2, 4, 8) and key is not None and uniform(key.quantizer.levels, k_bits)
        self._v_uniform = v_bits in (2, 4, 8) and value is not None and uniform(value.levels, v_bits)
        self.reset()

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, key=None, value=None, backend="torch", **_) -> "QuantizedStore":
        return cls(policy.k, policy.v, policy.sink, policy.buffer, dtype, key, value, backend, block=BLOCK, flush=FLUSH)

    @property
    def exact(self) -> bool:                                               # type: ignore[override]
        return self.k_bits >= 16 and self.v_bits >= 16

    @property
    def quantizes(self) -> bool:
        return self.k_bits < 16 or self.v_bits < 16

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.buf_k = self.buf_v = None
        self.blocks: list[Block] = []
        self.n_body = 0
        self.first = self.seen = 0                                         # position of the first token; after last

    def __len__(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2] + self.n_body + self.buf_k.shape[2]

    # ---- append -------------------------------------------------------------------------------------------------

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t] (consecutive, continuing what was appended)."""
        if self.sink_k is None:
            if self.key is not None:
                self.key.quantizer = self.key.quantizer.to(k.device)
            if self.value is not None and self.value.levels is not None:
                self.value.levels = self.value.levels.to(k.device)
        append_sixteen_bit(self, k, v, pos, self._quantize, self.quantizes)

    def _quantize(self, xk: torch.Tensor, xv: torch.Tensor, start: int) -> None:
        """Append xk, xv [B, h, n, D] (positions start..start+n-1) to the body's last block (or a new one)."""
        n = xk.shape[2]
        new = Block(start, n, xk, xv)
        if self.k_bits < 16:
            q = self.key.quantizer
            src = self.key.rope.unrotate(xk, start) if self.key.rope is not None else xk.float()
            new.k = cupy_kernels.quantize_keys(src, q.lo, q.span, q.levels, q.bits, backend=self.backend)
            if self.key.outliers:
                tn = q.normalise(src)
                hit = ((tn < 0) | (tn > 1)).permute(2, 0, 1, 3).reshape(-1)   # token-major [n·B·h·D]
                idx = hit.nonzero().view(-1)
                new.out_idx = idx.to(torch.int32)
                new.out_val = src.permute(2, 0, 1, 3).reshape(-1)[idx].to(torch.float16)
        if self.v_bits < 16:
            f = self.value
            new.v, new.v_lo, new.v_span = cupy_kernels.quantize_values(xv, f.levels, f.bits, f.group,
                                                                       backend=self.backend)
        last = self.blocks[-1] if self.blocks else None
        if last is None or last.n >= self.block:
            self.blocks.append(new)
        else:
            if new.out_idx is not None:
                new.out_idx = new.out_idx + last.n * xk.shape[0] * xk.shape[1] * xk.shape[3]
            last.k, last.v = torch.cat([last.k, new.k], 2), torch.cat([last.v, new.v], 2)
            if new.v_lo is not None:
                last.v_lo, last.v_span = torch.cat([last.v_lo, new.v_lo], 2), torch.cat([last.v_span, new.v_span], 2)
            if new.out_idx is not None:
                last.out_idx, last.out_val = torch.cat([last.out_idx, new.out_idx]), torch.cat([last.out_val, new.out_val])
            last.n += n
        self.n_body += n

    # ---- read ---------------------------------------------------------------------------------------------------

    def block_keys(self, blk: Block, table: torch.Tensor | None = None) -> torch.Tensor:
        """The keys of one body block as attention sees them (post-RoPE), float32 [B, h, n, D]. table: key_table of
        this store's quantizer (None: decode without it)."""
        if self.k_bits >= 16:
            return blk.k.float()
        q = self.key.quantizer
        if self.k_bits in (2, 4, 8) and self._k_uniform:                # lo + (span / (2^b − 1))·code
            lo, step = self._key_affine()
            x = unpack_float(blk.k, self.k_bits)
            x = torch.addcmul(lo, step, x, out=x)
        elif self.k_bits in (2, 4, 8):
            if table is None:
                table = key_table(q)
            x = gather_bytes(blk.k, table, key_offsets(blk.k.shape[1], blk.k.shape[3], blk.k.device))
        else:                                                              # 3 bits: codes straddle bytes
            x = q.dequantize(blk.k)
        if blk.out_idx is not None and blk.out_idx.numel():
            flat = x.permute(2, 0, 1, 3).contiguous()
            flat.view(-1)[blk.out_idx.long()] = blk.out_val.float()
            x = flat.permute(1, 2, 0, 3).contiguous()
        if self.key.rope is not None:
            x = self.key.rope.rotate_rows(x, blk.start)
        return x

    def _masks(self, blk: Block, qpos: torch.Tensor, qmin: int) -> bool:
        """Whether some query at qpos may not see some key of `blk` (causal: a key after the first query)."""
        return blk.start + blk.n - 1 > qmin

    def _key_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """lo and span / (2^b − 1), each [h, 1, D], from the key ranges (per read, not held)."""
        q = self.key.quantizer
        return q.lo.unsqueeze(1), (q.span * (1.0 / (2 ** self.k_bits - 1))).unsqueeze(1)

    def block_values(self, blk: Block) -> torch.Tensor:
        """The values of one body block, float32 [B, h, n, D] (used by `read` and wide query chunks)."""
        if self.v_bits >= 16:
            return blk.v.float()
        f = self.value
        return quant.dequantize_tokens(blk.v, blk.v_lo, blk.v_span, f.bits, f.levels)

    def _weighted_values(self, p: torch.Tensor, blk: Block) -> torch.Tensor:
        """p [B, h, G·t, n] (unnormalised weights) → Σ_n p·v [B, h, G·t, D]. For a narrow query (a decode step) the
        block's values are not decoded to floats: per value group c, Σ_n p_n (lo_nc + span_nc·t_nc) =
        p·lo_c + (p⊙span_c)·t_c, with t the unpacked codes (uniform levels: span/(2^b − 1) per code step)."""
        b, h, gt, n = p.shape
        c = blk.v_lo.shape[-1] if blk.v_lo is not None else 0
        if not (self.v_bits in (2, 4, 8) and self._v_uniform) or gt * c > 8 * blk.v.shape[-1] // self.v_bits:
            if self.v_bits in (2, 4, 8) and self._v_uniform:               # wide query: decode the block once
                codes = unpack_float(blk.v, self.v_bits)                   # [B, h, n, D]
                step = blk.v_span.float().mul_(1.0 / (2 ** self.v_bits - 1)).unsqueeze(-1)
                v = torch.addcmul(blk.v_lo.float().unsqueeze(-1), step, codes.view(b, h, n, c, -1)).view(b, h, n, -1)
                return torch.matmul(p, v)
            return torch.matmul(p, self.block_values(blk))
        t = unpack_float(blk.v, self.v_bits)                               # [B, h, n, D] codes as floats
        g = t.shape[-1] // c
        span = blk.v_span.float().mul_(1.0 / (2 ** self.v_bits - 1)).transpose(-1, -2)      # [B, h, C, n]
        w = torch.empty(b, h, c, gt, n, dtype=torch.float32, device=p.device)
        torch.mul(p.unsqueeze(2), span.unsqueeze(-2), out=w)               # [B, h, C, G·t, n]: p⊙span_c per group
        w = w.view(b, h, c * gt, n)
        # one matmul for every group against all channels; group c's rows are kept for its own channels only
        out = torch.matmul(w, t).view(b, h, c, gt, c, g).diagonal(dim1=2, dim2=4)   # [B, h, G·t, g, C]
        base = torch.matmul(p, blk.v_lo.float())                           # [B, h, G·t, C]
        return (out.transpose(-1, -2) + base.unsqueeze(-1)).reshape(b, h, gt, c * g)

    def attend(self, q, qpos, scaling, new=None):
        """q [B, h·G, t, D] → (out, lse) over sink | body blocks | buffer (| the exact new chunk), causal."""
        parts = []
        b, hq, t, d = q.shape
        if t == 1 and new is not None and self.blocks and int(qpos[0]) >= self.seen \
                and type(self).visible is Store.visible:
            return self._decode_step(q, scaling, new)
        if len(self):
            h = self.sink_k.shape[1]
            g = hq // h
            qf = q.float().reshape(b, h, g * t, d)
            qmin = int(qpos.min())
            ktab = key_table(self.key.quantizer) if self.k_bits in (2, 4, 8) and self.blocks \
                and not self._k_uniform else None
            qs = qf * scaling                                                # [B, h, G·t, D]
            for blk in self.blocks:
                # q·kᵀ with the block transposed (BLAS reads it as is; [n, D]·[D, G·t] is ~4x slower on CPU)
                sc = torch.matmul(qs, self.block_keys(blk, ktab).transpose(-1, -2))      # [B, h, G·t, n]
                softcap_(sc, scaling)
                if self._masks(blk, qpos, qmin):                           # some key hidden from some query
                    kpos = torch.arange(blk.start, blk.start + blk.n, device=q.device)
                    sc.masked_fill_(~self.visible(qpos, kpos).repeat(g, 1), float("-inf"))
                m = sc.amax(-1, keepdim=True).clamp_min(-1e30)             # [B, h, G·t, 1]
                pw = sc.sub_(m).exp_()                                     # unnormalised weights, in place
                lsum = pw.sum(-1, keepdim=True)                            # [B, h, G·t, 1]
                out = self._weighted_values(pw, blk) / lsum.clamp_min(1e-30)
                lse = (m + lsum.log()).reshape(b, hq, t)
                parts.append((out.reshape(b, hq, t, d), lse))
        return attend_sixteen_bit(self, q, qpos, scaling, new, parts)

    def _decode_step(self, q: torch.Tensor, scaling: float, new) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` for a decode step (one query per head, after every held token, causal: every key is visible):
        one softmax over body blocks | sink | buffer | the new token instead of a partial per part merged by
        log-sum-exp (the same result up to float rounding, with a third of the small ops).
        q [B, h·G, 1, D] → (out [B, h·G, 1, D], lse [B, h·G, 1]) float32."""
        b, hq, _, d = q.shape
        h = self.sink_k.shape[1]
        qs = q.float().reshape(b, h, hq // h, d) * scaling                 # [B, h, G, D]
        ktab = key_table(self.key.quantizer) if self.k_bits in (2, 4, 8) and not self._k_uniform else None
        k16 = cat_float(self.sink_k, self.buf_k, new[0])                 # [B, h, s + b + 1, D]
        scores = [torch.matmul(qs, self.block_keys(blk, ktab).transpose(-1, -2)) for blk in self.blocks]
        scores.append(torch.matmul(qs, k16.transpose(-1, -2)))
        s = softcap_(torch.cat(scores, -1), scaling)                      # [B, h, G, N]
        m = s.amax(-1, keepdim=True)                                       # [B, h, G, 1], finite: no mask
        p = s.sub_(m).exp_()
        total = p.sum(-1, keepdim=True)
        v16 = cat_float(self.sink_v, self.buf_v, new[1])
        out = torch.matmul(p[..., self.n_body:], v16)                      # [B, h, G, D]
        start = 0
        for blk in self.blocks:
            out += self._weighted_values(p[..., start:start + blk.n], blk)
            start += blk.n
        out.div_(total)
        return out.view(b, hq, 1, d), total.log_().add_(m).view(b, hq, 1)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held token dequantized whole: keys, values float32 [B, h, n, D] and positions [n] (for tests and the
        reference; `attend` never builds this)."""
        ks = [self.sink_k.float()] + [self.block_keys(b) for b in self.blocks] + [self.buf_k.float()]
        vs = [self.sink_v.float()] + [self.block_values(b) for b in self.blocks] + [self.buf_v.float()]
        pos = torch.arange(self.first, self.seen, device=self.sink_k.device)
        return torch.cat(ks, 2), torch.cat(vs, 2), pos

    # ---- batch and rollback (generate's beam search, num_return_sequences, assisted decoding) --------------------

    def select_batch(self, idx):
        hd = 0 if self.sink_k is None else self.sink_k.shape[1] * self.sink_k.shape[3]      # h·D
        select_sixteen_bit(self, idx, lambda blk: _select_block(blk, idx, hd))

    # ---- bytes --------------------------------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in (self.sink_k, self.sink_v, self.buf_k, self.buf_v) if t is not None]
        for blk in self.blocks:
            held += blk.tensors()
        return held

    def constants_nbytes(self) -> int:
        """Per-layer constants reading needs (key ranges and codebooks, float32), counted once."""
        n = self.key.quantizer.nbytes() if self.k_bits < 16 else 0
        if self.v_bits < 16 and self.value.levels is not None:
            n += 4 * self.value.levels.numel()
        return n

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors()) + (self.constants_nbytes() if len(self) else 0)

    # ---- the fused CuPy decode path -----------------------------------------------------------------------------

    def fused_ok(self) -> bool:
        """The fused kernel reads sink | packed body | buffer directly; pre-RoPE keys, key outliers, a zero buffer
        (the new token would be read quantized) and mixed 16-bit/quantized K and V take the torch path."""
        if not self.quantizes:
            return True
        return (self.k_bits < 16 and self.v_bits < 16 and self.n_buffer > 0 and self.key.rope is None
                and not self.key.outliers)

    def fused_decode(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """q [B, h·G, D] → [B, h·G, D] with cupy_kernels (after the new token was appended: it sits in the buffer).
        The body blocks are concatenated for the kernel (a copy of the packed codes, not a dequantization)."""
        if not self.quantizes:
            return cupy_kernels.window_attention(q, torch.cat([self.sink_k, self.buf_k], 2),
                                                 torch.cat([self.sink_v, self.buf_v], 2), scaling, backend="cupy")
        kq, vf = self.key.quantizer, self.value
        cat = lambda name: torch.cat([getattr(b, name) for b in self.blocks], 2) if self.blocks else None  # noqa: E731
        return cupy_kernels.decode_attention(q, self.sink_k, self.sink_v, cat("k"), kq.lo, kq.span, kq.levels,
                                             self.k_bits, cat("v"), cat("v_lo"), cat("v_span"), vf.levels, self.v_bits,
                                             self.buf_k, self.buf_v, scaling, backend="cupy")
