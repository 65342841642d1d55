"""KV quantization primitives (torch reference): codebooks, bit packing, per-channel keys, per-token values.

Keys are quantized per channel with ranges calibrated offline (KVQuant, Hooper et al., arXiv 2401.18079: per-channel
key ranges at percentiles, optional sparse full-precision outliers, optional non-uniform per-head codebooks from
k-means); values per token in groups of channels (KIVI, Liu et al., arXiv 2402.02750). Static key ranges let every
token be quantized the moment it arrives, so no key has to wait for a group of tokens as in KIVI.

One code path serves uniform and non-uniform formats: a value x with range (lo, span) is normalised to
t = (x - lo) / span in [0, 1] and encoded as the nearest of 2^bits sorted `levels` in [0, 1]; uniform is
levels = linspace(0, 1, 2^bits). Decoding is lo + levels[code] * span.

Packed layout (shared with cupy_kernels/): codes of the last axis are taken in groups of 8; a group becomes `bits`
bytes holding the little-endian integer sum(code_i << (bits * i)). So 4-bit puts code 2j in the low nibble of byte j
and code 2j+1 in its high nibble; 2-bit puts codes 4j..4j+3 in byte j, lowest bits first; 3-bit groups 8 codes in
3 bytes; 8-bit is one code per byte. The last axis must be a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.errors import KvtoolError

BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16          # per-token value scales (lo, span) are stored in 16 bits


def uniform_levels(bits: int) -> torch.Tensor:
    """[2^bits] evenly spaced levels in [0, 1]."""
    return torch.linspace(0.0, 1.0, 2 ** bits)


def encode(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level of each element of t (normalised, any shape) → uint8 codes, same shape. levels: [..., 2^b]
    sorted ascending, broadcast over t's leading axes when it has more than one axis (per-head codebooks)."""
    mid = (levels[..., 1:] + levels[..., :-1]) / 2                          # [..., 2^b - 1] decision boundaries
    if mid.dim() == 1:
        return torch.bucketize(t.contiguous(), mid.to(t.dtype)).to(torch.uint8)
    # per-head codebooks: mid [H, 2^b-1] against t [B, H, ...]
    b, h = t.shape[0], t.shape[1]
    flat = t.reshape(b, h, -1).transpose(0, 1).reshape(h, -1).contiguous()  # [H, B·rest]
    codes = torch.searchsorted(mid.to(t.dtype).contiguous(), flat)          # [H, B·rest]
    return codes.reshape(h, b, -1).transpose(0, 1).reshape(t.shape).to(torch.uint8)


def decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes → levels (float32), same shape. levels: [2^b] or per head [H, 2^b] with codes [B, H, ...]."""
    if levels.dim() == 1:
        return levels[codes.long()]
    h, n = levels.shape
    idx = codes.long() + (torch.arange(h, device=codes.device) * n).view(1, h, *([1] * (codes.dim() - 2)))
    return levels.reshape(-1)[idx]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (D % 8 == 0, each < 2^bits) → packed uint8 [..., D * bits / 8]."""
    d = codes.shape[-1]
    if d % 8:
        raise KvtoolError(f"cannot pack {d} codes per row: the length must be a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8).clone()
    g = codes.reshape(*codes.shape[:-1], d // 8, 8).to(torch.int64)
    word = (g << (bits * torch.arange(8, device=codes.device))).sum(-1)   # [..., D/8] ≤ 8·bits bits
    out = (word.unsqueeze(-1) >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
    return out.to(torch.uint8).reshape(*codes.shape[:-1], d // 8 * bits)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., D * bits / 8] → uint8 codes [..., D]."""
    if bits == 8:
        return packed
    n = packed.shape[-1] // bits
    b = packed.reshape(*packed.shape[:-1], n, bits).to(torch.int64)
    word = (b << (8 * torch.arange(bits, device=packed.device))).sum(-1)   # [..., D/8]
    codes = (word.unsqueeze(-1) >> (bits * torch.arange(8, device=packed.device))) & (2 ** bits - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], n * 8)


@dataclass
class ChannelQuantizer:
    """Keys: static per-channel ranges for one layer (KVQuant). lo, span: [H, D] float32; levels: [2^b] or [H, 2^b].

    With `outliers`, elements outside [lo, lo + span] are also kept exactly (sparse, 16-bit) by the caller;
    without, they are clamped to the range."""
    lo: torch.Tensor
    span: torch.Tensor
    bits: int
    levels: torch.Tensor

    @classmethod
    def from_range(cls, lo: torch.Tensor, hi: torch.Tensor, bits: int, levels: torch.Tensor | None = None):
        span = (hi - lo).clamp_min(1e-6)
        return cls(lo.float(), span.float(), bits, uniform_levels(bits) if levels is None else levels.float())

    def to(self, device) -> "ChannelQuantizer":
        return ChannelQuantizer(self.lo.to(device), self.span.to(device), self.bits, self.levels.to(device))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D] → t in the range's units (not clamped)."""
        return (x.float() - self.lo[None, :, None]) / self.span[None, :, None]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D] → packed codes [B, H, T, D·bits/8]."""
        return pack(encode(self.normalise(x).clamp(0, 1), self.levels), self.bits)

    def dequantize(self, packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """packed [B, H, T, D·bits/8] → [B, H, T, D]."""
        t = decode(unpack(packed, self.bits), self.levels)
        return (self.lo[None, :, None] + t * self.span[None, :, None]).to(dtype)

    def nbytes(self) -> int:
        """The constants this layer's keys need (ranges + codebook), in float32."""
        return 4 * (self.lo.numel() + self.span.numel() + self.levels.numel())


def quantize_tokens(x: torch.Tensor, bits: int, group: int, levels: torch.Tensor | None = None):
    """Values per token (KIVI): x [B, H, T, D] → (packed [B, H, T, D·bits/8], lo [B, H, T, D/group],
    span [B, H, T, D/group]); lo/span are min and max−min of each group of `group` channels, in float16."""
    b, h, t, d = x.shape
    if d % group:
        raise KvtoolError(f"value group {group} does not divide head_dim {d}")
    levels = uniform_levels(bits).to(x.device) if levels is None else levels
    g = x.float().reshape(b, h, t, d // group, group)
    lo = g.amin(-1).to(SCALE_DTYPE)
    span = (g.amax(-1) - lo.float()).to(SCALE_DTYPE)
    lo32, span32 = lo.float().unsqueeze(-1), span.float().clamp_min(1e-8).unsqueeze(-1)
    norm = ((g - lo32) / span32).clamp(0, 1).reshape(b, h, t, d)
    return pack(encode(norm, levels), bits), lo, span


def dequantize_tokens(packed: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, bits: int,
                      levels: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """Inverse of `quantize_tokens` → [B, H, T, D]."""
    levels = uniform_levels(bits).to(packed.device) if levels is None else levels
    t = decode(unpack(packed, bits), levels)                                 # [B, H, T, D]
    b, h, n, d = t.shape
    group = d // lo.shape[-1]
    x = lo.float().unsqueeze(-1) + t.reshape(b, h, n, d // group, group) * span.float().unsqueeze(-1)
    return x.reshape(b, h, n, d).to(dtype)


def key_range(profile, rope: str = "post", clip: float = 0.999) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated per-channel key range (lo, hi), each float32 [L, H, D], from a profile's traced statistics.

    rope: "post" (keys as the cache sees them) or "pre" (before RoPE). clip: 1 takes the traced min/max; a level q
    below 1 takes the (1 - q, q) quantiles (KVQuant clips keys at 0.5/99.5 percentiles, i.e. q = 0.995)."""
    from kvtool.sections import key_channels

    if key_channels(rope, "min") not in profile:
        raise KvtoolError(f"the profile has no {key_channels(rope, '*')} ranges (make it with `kvtool profile`)")
    if clip >= 1.0:
        return profile[key_channels(rope, "min")].float(), profile[key_channels(rope, "max")].float()
    levels = profile.calibration.get("methods", {}).get("trace", {}).get("quantile_levels", [])
    idx = {round(float(q), 6): i for i, q in enumerate(levels)}
    lo_i, hi_i = idx.get(round(1.0 - clip, 6)), idx.get(round(clip, 6))
    if lo_i is None or hi_i is None:
        raise KvtoolError(f"the profile has no {1 - clip:g}/{clip:g} key quantiles (it has {levels}); use kclip=1")
    q = profile[key_channels(rope, "quantiles")].float()                                 # [L, H, D, Q]
    return q[..., lo_i], q[..., hi_i]
