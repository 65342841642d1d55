"""Quantization formats of a layer's retrieval-head keys and values (read by kvtool/stores/quantized.py), and the
model's RoPE table for pre-RoPE keys.

Keys use static per-channel ranges (optionally before RoPE: RoPE is undone before quantizing and redone on read,
KVQuant arXiv 2401.18079); values use per-token group ranges (KIVI arXiv 2402.02750).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch

from kvtool import quant


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # rotary module -> {layer_type: RopeTable}
ROPE_STEP = 512                       # a table grows to the next multiple of this many positions


class RopeTable:
    """cos/sin [n, D] (float32) for positions 0..n-1 from a model's own rotary embedding, grown on demand to the next
    multiple of ROPE_STEP positions. One table per model and layer type, shared by every layer of every cache of that
    model (the rotation depends on neither): like the model's own rotary buffers it is model state, not per-sequence
    state, so CompressedCache.nbytes() leaves it out and CompressedCache.shared_nbytes() reports it. A rotary embedding
    with one table per layer type (Gemma 3: sliding layers have their own base) is read for `layer_type`."""

    def __init__(self, rotary, layer_type: str | None = None):
        self.rotary, self.layer_type = rotary, layer_type
        self.cos = self.sin = self.sin_signed = None

    @classmethod
    def of(cls, model, head_dim: int, layer_type: str = "full_attention") -> "RopeTable | None":
        """The shared table of `model`'s layers of `layer_type` (full-attention layers unless told; only a rotary
        embedding that takes a layer type reads it); None without a rotary embedding (GPT-2) or with a partial one."""
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None:
            return None
        typed = "layer_type" in inspect.signature(rotary.forward).parameters
        tables = _TABLES.setdefault(rotary, {})
        key = layer_type if typed else None
        if key not in tables:
            table = cls(rotary, key)
            cos, _ = table.get(0, 1, torch.device("cpu"))
            tables[key] = table if cos.shape[-1] == head_dim else None      # partial rotary: not supported
        return tables[key]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.cos, self.sin, self.sin_signed) if x is not None)

    def get(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != torch.device(device):
            n = -(-max(end, 1) // ROPE_STEP) * ROPE_STEP
            pos = torch.arange(n, device=device).view(1, -1)
            dev_x = torch.zeros(1, device=device, dtype=torch.float32)
            typed = {} if self.layer_type is None else {"layer_type": self.layer_type}
            cos, sin = self.rotary(dev_x, pos, **typed)               # [1, n, D]
            self.cos, self.sin = cos[0].float(), sin[0].float()
            half = self.sin.shape[-1] // 2
            self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], -1)
        return self.cos[start:end], self.sin[start:end]

    def rotate_rows(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """`rotate` for float32 x [..., T, D] without rotate_half's concatenation: with halves x0, x1,
        out0 = x0·cos0 − x1·sin0 and out1 = x1·cos1 + x0·sin1 (the sign lives in the cached signed-sin table):
        one full-width x·cos, then the two half-width sin terms added in place."""
        n, d = x.shape[-2], x.shape[-1]
        cos, _ = self.get(start, start + n, x.device)
        sin = self.sin_signed[start:start + n]
        h = d // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[:, :h])
        out[..., h:].addcmul_(x[..., :h], sin[:, h:])
        return out

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
