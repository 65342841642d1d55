"""H2O: heavy hitters by accumulated attention plus a recent window, evicted as tokens arrive (Zhang et al., "H2O:
Heavy-Hitter Oracle", arXiv 2306.14048).

Every held token carries the attention it has received so far, summed over every query that saw it and over the
query heads of its KV group (one score and one token set per KV head: GQA memory is really saved). After each append
the store keeps `budget` tokens (a fraction: of the tokens seen so far): the most recent budget // 2 and, of the older
ones, those with the largest accumulated attention (H2O's equal split of heavy hitters and recent tokens); the rest
are freed. In a chunked prefill each chunk attends exactly over what is held plus itself (causal), then the store
evicts: the prompt never needs more than budget + chunk tokens (the paper evicts after a whole-prompt attention;
kvtool's chunks make it the streaming variant). Scores are float32 [B, h, n], counted in `nbytes`.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.stores.base import batch_rows, register, tensor_bytes
from kvtool.stores.tokens import TokenStore, budget_tokens


@register("h2o")
class H2OStore(TokenStore):
    """Heavy hitters + recent window under a token budget; see the module docstring."""

    reads = ("select", "budget", "dtype")

    def __init__(self, budget, dtype):
        super().__init__(budget, dtype)

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, **_) -> "H2OStore":
        if policy.read is not None:
            raise KvtoolError("policy read (RocketKV stage 2) reads pages of a token set chosen once; with select=h2o "
                              "the set changes every step: use select=snapkv++ or leave read unset")
        return cls(policy.budget, dtype)

    def reset(self) -> None:
        super().reset()
        self.acc = None                   # [B, h, n] float32: attention each held token received
        self.pending = None               # [B, h, t]: what the chunk being attended received (until its append)

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.acc)

    def tensors(self):
        return super().tensors() + ([self.acc] if self.acc is not None else [])

    def attend(self, q, qpos, scaling, new=None):
        if new is not None:
            self.group = q.shape[1] // new[0].shape[1]
        if self.k is None and new is None:
            return super().attend(q, qpos, scaling, new)
        s, k, v = self.scores(q, qpos, scaling, new)
        held = len(self)

        def received(p):                                            # p [B, h, G, t, held + t]
            got = p.sum((2, 3))
            if held:
                self.acc = self.acc + got[..., :held]
            self.pending = got[..., held:] if new is not None else None

        return self.finish(s, v, q.shape, received)

    def append(self, k, v, pos):
        super().append(k, v, pos)
        t = k.shape[2]
        got = self.pending if self.pending is not None and self.pending.shape[-1] == t else \
            k.new_zeros(k.shape[0], k.shape[1], t, dtype=torch.float32)
        self.acc = got.clone() if self.acc is None else torch.cat([self.acc, got], -1)
        self.pending = None
        n, keep = len(self), budget_tokens(self.budget, self.seen)
        if n <= keep:
            return
        recent = keep // 2
        heavy = keep - recent
        old = self.acc[..., :n - recent]                                              # [B, h, n - recent]
        top = old.topk(heavy, -1).indices.sort(-1).values
        last = torch.arange(n - recent, n, device=top.device).view(1, 1, -1).expand(top.shape[0], top.shape[1], -1)
        idx = torch.cat([top, last], 2)
        self.acc = self.acc.gather(2, idx)
        self.keep(idx)

    def select_batch(self, idx):
        super().select_batch(idx)
        self.acc = batch_rows(self.acc, idx)

    def crop(self, end):
        super().crop(end)
        if self.acc is not None:
            self.acc = self.acc[..., :len(self)].clone()
