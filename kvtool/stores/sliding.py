"""A model's own sliding-window layer (Mistral, Gemma 2/3, Qwen3 `layer_types` = "sliding_attention" with
`config.sliding_window`): the layer only ever attends to its last `window` positions, so the store keeps the last
`window - 1` tokens (what transformers' DynamicSlidingWindowLayer keeps) in 16 bits and frees the rest at once.
The store is exact; it reads no policy field (the window is the model's, not a compression choice)."""

from __future__ import annotations

import torch

from kvtool.stores.base import Store, batch_rows, empty_partial, partial, register, tensor_bytes
from kvtool.windows import sliding_allowed


@register("sliding")
class SlidingStore(Store):
    """keys, values [B, h, ≤ window-1, D] in `dtype`: the most recent tokens."""

    reads = ("dtype",)

    def __init__(self, window: int, dtype: torch.dtype):
        self.window, self.dtype = window, dtype
        self.reset()

    def reset(self) -> None:
        self.k = self.v = None
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def visible(self, qpos, kpos):
        return sliding_allowed(qpos, kpos, self.window)

    def append(self, k, v, pos):
        keep = self.window - 1
        if self.k is None:
            self.k = self.v = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=self.dtype)
        if self.k.shape[2] + k.shape[2] > keep and not self.record_past:   # cut first: the dropped part is never copied
            old = max(0, keep - k.shape[2])
            self.k = torch.cat([self.k[:, :, self.k.shape[2] - old:], k[:, :, k.shape[2] - (keep - old):].to(self.dtype)], 2)
            self.v = torch.cat([self.v[:, :, self.v.shape[2] - old:], v[:, :, v.shape[2] - (keep - old):].to(self.dtype)], 2)
        else:
            self.k = torch.cat([self.k, k.to(self.dtype)], 2)
            self.v = torch.cat([self.v, v.to(self.dtype)], 2)
        self.seen = int(pos[-1]) + 1

    def select_batch(self, idx):
        self.k, self.v = batch_rows(self.k, idx), batch_rows(self.v, idx)

    def rollback_refusal(self):
        return None

    def crop_refusal(self, end):
        if self.k is None or end > self.seen:
            return None
        lo = max(0, end - (self.window - 1))
        if lo < end and lo < self.seen - len(self):
            return (f"the model's sliding-window layer would need token {lo} back to drop {self.seen - end} tokens, "
                    f"but it keeps only the last {self.window - 1}")
        return None

    def crop(self, end):
        """Drop positions ≥ end, then keep the last `window - 1` (what the layer holds after seeing `end` tokens)."""
        if self.k is None or end > self.seen:
            return
        held = self.seen - len(self)
        a, b = max(0, end - (self.window - 1) - held), max(0, end - held)
        self.k, self.v = self.k[:, :, a:b].clone(), self.v[:, :, a:b].clone()
        self.seen = end

    def attend(self, q, qpos, scaling, new=None):
        ks, vs, kpos = [], [], []
        if len(self):
            ks.append(self.k.float())
            vs.append(self.v.float())
            kpos.append(torch.arange(self.seen - len(self), self.seen, device=q.device))
        if new is not None:
            ks.append(new[0].float())
            vs.append(new[1].float())
            kpos.append(qpos)
        if not kpos:
            return empty_partial(q)
        kpos = torch.cat(kpos)
        allowed = self.visible(qpos, kpos)
        return partial(q, torch.cat(ks, 2), torch.cat(vs, 2), scaling, None if bool(allowed.all()) else allowed)

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v) if t is not None]
