"""The streaming window store: the first `sink` tokens and the last `recent` tokens, in 16 bits (StreamingLLM,
Xiao et al., arXiv 2309.17453; the streaming heads of DuoAttention, arXiv 2410.10819).

Tokens that leave the window are freed at once (the recent tensor is cut and copied, not masked), so the store
holds at most sink + recent tokens per head whatever the context length.
"""

from __future__ import annotations

import torch

from kvtool.policy import _count, register_field, simple
from kvtool.stores.base import Store, batch_rows, cat_float, empty_partial, partial, register, tensor_bytes
from kvtool.windows import window_allowed

register_field(
    simple("sink", lambda t: _count("sink", t, 0), 64, "tokens",
           "First tokens kept in 16 bits, by streaming heads and by retrieval heads (ahead of the quantized body).",
           "window, quantized"),
    simple("recent", lambda t: _count("recent", t, 1), 256, "tokens", "Most recent tokens a streaming head keeps.",
           "window"),
)


@register("window")
class WindowStore(Store):
    """sink | recent, both [B, h, ·, D] in `dtype`; positions: 0..sink-1 and the last len(recent) tokens seen."""

    reads = ("sink", "recent", "dtype")

    def __init__(self, sink: int, recent: int, dtype: torch.dtype):
        self.n_sink, self.n_recent, self.dtype = sink, recent, dtype
        self.reset()

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, **_) -> "WindowStore":
        return cls(policy.sink, policy.recent, dtype)

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        self.seen = 0                                                    # position after the last token appended

    def __len__(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2] + self.recent_k.shape[2]

    def visible(self, qpos, kpos):
        return window_allowed(qpos, kpos, self.n_sink, self.n_recent)

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t] (consecutive, continuing what was appended)."""
        if self.sink_k is None:
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=self.dtype)
            self.sink_k = self.sink_v = self.recent_k = self.recent_v = empty
        t = k.shape[2]
        if t == 1 and self.seen >= self.n_sink and self.recent_k.shape[2] >= self.n_recent and not self.record_past:
            self.recent_k = torch.cat([self.recent_k[:, :, 1 - self.n_recent:] if self.n_recent > 1
                                       else self.recent_k[:, :, :0], k.to(self.dtype)], 2)
            self.recent_v = torch.cat([self.recent_v[:, :, 1 - self.n_recent:] if self.n_recent > 1
                                       else self.recent_v[:, :, :0], v.to(self.dtype)], 2)
            self.seen = int(pos[-1]) + 1
            return
        take = max(0, min(t, self.n_sink - self.seen))                   # tokens that are still sink tokens
        if take:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :take].to(self.dtype)], 2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :take].to(self.dtype)], 2)
        keep = min(self.n_recent, t - take)                              # new tokens that stay recent
        old = min(self.recent_k.shape[2], self.n_recent - keep)          # older recent tokens that stay
        if self.record_past:                                             # keep all until crop() (assisted decoding)
            keep, old = t - take, self.recent_k.shape[2]
        self.recent_k = torch.cat([self.recent_k[:, :, self.recent_k.shape[2] - old:],
                                   k[:, :, t - keep:].to(self.dtype)], 2)
        self.recent_v = torch.cat([self.recent_v[:, :, self.recent_v.shape[2] - old:],
                                   v[:, :, t - keep:].to(self.dtype)], 2)
        self.seen = int(pos[-1]) + 1

    def select_batch(self, idx):
        self.sink_k, self.sink_v = batch_rows(self.sink_k, idx), batch_rows(self.sink_v, idx)
        self.recent_k, self.recent_v = batch_rows(self.recent_k, idx), batch_rows(self.recent_v, idx)

    def _recent_range(self, end: int) -> tuple[int, int]:
        """Positions [lo, end) of the recent part a window store holds after seeing `end` tokens."""
        return max(self.n_sink, end - self.n_recent), end

    def rollback_refusal(self):
        return None

    def crop_refusal(self, end):
        if self.sink_k is None or end > self.seen:
            return None
        lo, _ = self._recent_range(end)
        held = self.seen - self.recent_k.shape[2]                        # first recent position held
        if lo < end and lo < held:
            return (f"the window store would need token {lo} back to drop {self.seen - end} tokens, but it keeps "
                    f"only the last {self.n_recent} (the rest are freed)")
        return None

    def crop(self, end):
        """Drop positions ≥ end, then keep the last `recent` (what the store holds after seeing `end` tokens)."""
        if self.sink_k is None or end > self.seen:
            return
        held = self.seen - self.recent_k.shape[2]
        lo, hi = self._recent_range(end)
        a, b = max(0, lo - held), max(0, hi - held)
        self.recent_k, self.recent_v = self.recent_k[:, :, a:b].clone(), self.recent_v[:, :, a:b].clone()
        if end < self.sink_k.shape[2]:
            self.sink_k, self.sink_v = self.sink_k[:, :, :end].clone(), self.sink_v[:, :, :end].clone()
        self.seen = end

    def positions(self) -> torch.Tensor:
        """[n] absolute positions of the held tokens (sink, then recent)."""
        n_rec = self.recent_k.shape[2]
        dev = self.sink_k.device
        return torch.cat([torch.arange(self.sink_k.shape[2], device=dev),
                          torch.arange(self.seen - n_rec, self.seen, device=dev)])

    def attend(self, q, qpos, scaling, new=None):
        """q [B, h·G, t, D] → (out, lse) over sink | recent (| the exact new chunk), under the window rule."""
        if new is not None and q.shape[2] == 1 and int(qpos[0]) == self.seen:
            # a decode step: the window rule only drops the oldest recent token once `recent` are held
            drop = max(0, 0 if self.recent_k is None else self.recent_k.shape[2] - (self.n_recent - 1))
            if self.sink_k is None:
                return partial(q, new[0], new[1], scaling)
            k = cat_float(self.sink_k, self.recent_k[:, :, drop:], new[0])
            v = cat_float(self.sink_v, self.recent_v[:, :, drop:], new[1])
            return partial(q, k, v, scaling)
        parts_k, parts_v, kpos = [], [], []
        if len(self):
            parts_k += [self.sink_k, self.recent_k]
            parts_v += [self.sink_v, self.recent_v]
            kpos.append(self.positions())
        if new is not None:
            parts_k.append(new[0])
            parts_v.append(new[1])
            kpos.append(qpos)
        if not kpos:
            return empty_partial(q)
        dtype = torch.float32
        k = torch.cat([p.to(dtype) for p in parts_k], 2)
        v = torch.cat([p.to(dtype) for p in parts_v], 2)
        kpos = torch.cat(kpos)
        allowed = self.visible(qpos, kpos)
        return partial(q, k, v, scaling, None if bool(allowed.all()) else allowed)

    def nbytes(self) -> int:
        return tensor_bytes(self.sink_k, self.sink_v, self.recent_k, self.recent_v)

    def fused_ok(self) -> bool:
        return True

    def fused_decode(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """A decode step on the CuPy kernel, after the new token was appended: q [B, h·G, D] → [B, h·G, D] over the
        sink and the last `recent` tokens (exactly what the window rule lets the newest token see)."""
        import cupy_kernels

        return cupy_kernels.window_attention(q, torch.cat([self.sink_k, self.recent_k], 2),
                                             torch.cat([self.sink_v, self.recent_v], 2), scaling, backend="cupy")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v) if t is not None]

