"""Token stores for one layer's retrieval heads: 16-bit sink | quantized body | 16-bit recent buffer.

A `TokenStore` holds one kind of tensor (keys or values) of a layer's retrieval KV heads, in token order. The first
`sink` tokens stay in 16 bits (attention sinks, as KVQuant keeps them); the last `buffer` tokens stay in 16 bits; the
tokens in between are quantized (kvtool.quant) the moment they leave the buffer, and only their packed codes, scales
and outliers are held. With 16 bits there is no body: every token stays in the buffer.

Keys use static per-channel ranges (optionally before RoPE: RoPE is undone before quantizing and redone on read,
KVQuant arXiv 2401.18079); values use per-token group ranges (KIVI arXiv 2402.02750).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cupy_kernels
from kvtool import quant


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class RopeTable:
    """cos/sin [n, D] (float32) for positions 0..n-1 from a model's own rotary embedding, grown on demand; shared by
    every layer of a cache (the rotation does not depend on the layer)."""

    def __init__(self, rotary):
        self.rotary = rotary
        self.cos = self.sin = None

    @classmethod
    def of(cls, model, head_dim: int) -> "RopeTable | None":
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None:
            return None
        table = cls(rotary)
        cos, _ = table.get(0, 1, torch.device("cpu"))
        return table if cos.shape[-1] == head_dim else None          # partial rotary: not supported

    def get(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != torch.device(device):
            n = max(end, 2 * (0 if self.cos is None else self.cos.shape[0]), 64)
            pos = torch.arange(n, device=device).view(1, -1)
            dev_x = torch.zeros(1, device=device, dtype=torch.float32)
            cos, sin = self.rotary(dev_x, pos)                        # [1, n, D]
            self.cos, self.sin = cos[0].float(), sin[0].float()
        return self.cos[start:end], self.sin[start:end]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply RoPE to x [B, H, T, D] at positions start..start+T-1 (float32)."""
        cos, sin = self.get(start, start + x.shape[2], x.device)
        return x.float() * cos + rotate_half(x.float()) * sin

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Undo `rotate` (divides by cos² + sin², which is the attention scaling² for scaled RoPE variants)."""
        cos, sin = self.get(start, start + x.shape[2], x.device)
        return (x.float() * cos - rotate_half(x.float()) * sin) / (cos * cos + sin * sin)


@dataclass
class KeyFormat:
    """How a layer's retrieval-head keys are quantized: per-channel ranges of those heads + options."""
    quantizer: quant.ChannelQuantizer          # lo/span [R, D], levels [2^b] or [R, 2^b]
    rope: RopeTable | None                     # set: quantize before RoPE
    outliers: bool


@dataclass
class ValueFormat:
    bits: int
    group: int
    levels: torch.Tensor | None                # None: uniform; else [R, 2^b]


class TokenStore:
    """One kind (keys or values) of one layer's retrieval heads; see the module docstring.

    x arguments are [B, R, t, D]; positions are absolute (retrieval heads keep every token, so the i-th stored token
    is at position i)."""

    def __init__(self, bits: int, sink: int, buffer: int, dtype: torch.dtype,
                 key: KeyFormat | None = None, value: ValueFormat | None = None, backend: str = "torch"):
        self.bits, self.n_sink, self.n_buffer, self.dtype, self.backend = bits, sink, buffer, dtype, backend
        self.key, self.value = key, value
        self.sink = self.buf = None                 # [B, R, s, D], [B, R, b, D] in `dtype`
        self.codes = None                           # [B, R, T_q, D·bits/8] uint8
        self.lo = self.span = None                  # values: [B, R, T_q, D/group] float16
        self.out_idx = self.out_val = None          # key outliers: int32 flat index (token-major), float16 value
        self.n_body = 0

    def __len__(self) -> int:
        return sum(0 if t is None else t.shape[2] for t in (self.sink, self.buf)) + self.n_body

    def append(self, x: torch.Tensor) -> None:
        if self.sink is None:
            b, r, _, d = x.shape
            if self.key is not None:
                self.key.quantizer = self.key.quantizer.to(x.device)
            if self.value is not None and self.value.levels is not None:
                self.value.levels = self.value.levels.to(x.device)
            self.sink = x.new_zeros(b, r, 0, d, dtype=self.dtype)
            self.buf = self.sink.clone()
        take = max(0, min(x.shape[2], self.n_sink - self.sink.shape[2]))
        if take:
            self.sink = torch.cat([self.sink, x[:, :, :take].to(self.dtype)], 2)
        self.buf = torch.cat([self.buf, x[:, :, take:].to(self.dtype)], 2)
        if self.bits < 16 and self.buf.shape[2] > self.n_buffer:
            cut = self.buf.shape[2] - self.n_buffer
            self._quantize(self.buf[:, :, :cut], self.sink.shape[2] + self.n_body)
            self.buf = self.buf[:, :, cut:].clone()

    def _quantize(self, x: torch.Tensor, start: int) -> None:
        """Append x [B, R, n, D] (positions start..start+n-1) to the quantized body."""
        if self.key is not None:
            q = self.key.quantizer
            src = self.key.rope.unrotate(x, start) if self.key.rope is not None else x.float()
            codes = cupy_kernels.quantize_keys(src, q.lo, q.span, q.levels, q.bits, backend=self.backend)
            if self.key.outliers:
                t = q.normalise(src)
                hit = ((t < 0) | (t > 1)).permute(2, 0, 1, 3).reshape(-1)     # token-major [n·B·R·D]
                idx = hit.nonzero().view(-1)
                base = self.n_body * x.shape[0] * x.shape[1] * x.shape[3]
                vals = src.permute(2, 0, 1, 3).reshape(-1)[idx].to(torch.float16)
                self.out_idx = _cat1(self.out_idx, (idx + base).to(torch.int32))
                self.out_val = _cat1(self.out_val, vals)
            self.codes = _cat2(self.codes, codes)
        else:
            f = self.value
            codes, lo, span = cupy_kernels.quantize_values(x, f.levels, f.bits, f.group, backend=self.backend)
            self.codes, self.lo, self.span = _cat2(self.codes, codes), _cat2(self.lo, lo), _cat2(self.span, span)
        self.n_body += x.shape[2]

    def body(self, dtype=torch.float32) -> torch.Tensor | None:
        """The dequantized body [B, R, T_q, D] (post-RoPE keys), or None when empty."""
        if not self.n_body:
            return None
        if self.key is not None:
            x = self.key.quantizer.dequantize(self.codes)                       # [B, R, T_q, D] float32
            if self.key.outliers and self.out_idx is not None and self.out_idx.numel():
                flat = x.permute(2, 0, 1, 3).contiguous().view(-1)
                flat[self.out_idx.long()] = self.out_val.float()
                b, r, n, d = x.shape
                x = flat.view(n, b, r, d).permute(1, 2, 0, 3)
            if self.key.rope is not None:
                x = self.key.rope.rotate(x, self.sink.shape[2])
        else:
            f = self.value
            x = quant.dequantize_tokens(self.codes, self.lo, self.span, f.bits, f.levels)
        return x.to(dtype)

    def read(self, dtype) -> torch.Tensor:
        """Every stored token, [B, R, len, D], in `dtype`."""
        parts = [self.sink.to(dtype)]
        body = self.body(dtype)
        if body is not None:
            parts.append(body)
        parts.append(self.buf.to(dtype))
        return torch.cat(parts, 2)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink, self.buf, self.codes, self.lo, self.span, self.out_idx, self.out_val)
                if t is not None]

    def constants_nbytes(self) -> int:
        """Per-layer constants this store reads (key ranges and codebooks), counted once."""
        if self.bits >= 16:
            return 0
        if self.key is not None:
            return self.key.quantizer.nbytes()
        return 0 if self.value.levels is None else 4 * self.value.levels.numel()


def _cat1(a, b):
    return b if a is None else torch.cat([a, b])


def _cat2(a, b):
    return b if a is None else torch.cat([a, b], 2)
