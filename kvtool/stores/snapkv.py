"""SnapKV++ and SnapKV: prefill-time token selection by the prompt's last queries (SnapKV, Li et al., arXiv
2404.14469; SnapKV++, RocketKV stage 1, Behnam et al., arXiv 2502.14051).

When the prompt ends, the last `obs` prompt queries (the observation window) vote for the earlier prompt tokens: their
softmax attention over the prompt keys, summed over the window, pooled along the tokens (`pool` max or avg, an odd
`kernel`, stride 1) so neighbours of a chosen token come along. SnapKV++ (`select=snapkv++`) sums the pooled votes
over the query heads of each KV group and keeps one token set per KV head: the memory of GQA is really saved.
SnapKV (`select=snapkv`, the original) selects per query head: each query head keeps its own copy of its tokens
(`nbytes` counts the G copies). Either keeps the top `budget - obs` voted tokens plus the window itself, with their
absolute positions; tokens arriving after the selection (decode steps, a question appended after compression) are
kept.

When the prompt ends: kvtool's prefill (kvtool.cache.prefill) calls `CompressedCache.finish_prefill()` after the
last chunk, which selects in every SnapKV store (during its chunks the stores wait: `lazy` off, so a last chunk of
one token is still prompt); without it (model.generate on a fresh cache) a store selects at the first single-token
step that follows a multi-token forward. The store records the queries of the last `obs`
positions as chunks pass (a chunked prefill needs no second pass), and selects once: a later `finish_prefill` (a
second prompt segment) keeps what it holds. Until the selection every prompt token is held in 16 bits (SnapKV
compresses a prompt it has seen whole; the chunked prefill bounds the activations, not this peak).
Defaults of `obs` and `kernel`: the profile's `snapkv.` section (kvtool calibrate --method snapkv, per layer), else
RocketKV's 32 and 63.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.policy import _choice, _count, register_field, simple
from kvtool.select import snap_select, window_votes
from kvtool.stores.base import register, tensor_bytes
from kvtool.stores.tokens import TokenStore, budget_tokens

OBS, KERNEL = 32, 63                      # RocketKV's defaults (arXiv 2502.14051)


def _odd(text: str) -> int:
    n = _count("kernel", text, 1)
    if n % 2 == 0:
        raise KvtoolError(f"policy field 'kernel' must be odd (got {n})")
    return n


register_field(
    simple("obs", lambda t: _count("obs", t, 1), None, "tokens",
           "SnapKV observation window: the last prompt queries that vote (and are always kept). Unset: the profile's "
           "`snapkv.obs` (kvtool calibrate --method snapkv), else 32.", "snapkv"),
    simple("kernel", _odd, None, "odd tokens",
           "SnapKV pooling kernel along the tokens. Unset: the profile's `snapkv.kernel`, else 63.", "snapkv"),
    simple("pool", lambda t: _choice("pool", t, ("max", "avg")), "max", "`max`, `avg`", "SnapKV pooling.", "snapkv"),
)


@register("snapkv")
class SnapKVStore(TokenStore):
    """SnapKV++ (per KV group) or SnapKV (per query head) selection at the end of the prompt; see the module
    docstring."""

    reads = TokenStore.reads + ("obs", "kernel", "pool")

    def __init__(self, budget, dtype, obs: int = OBS, kernel: int = KERNEL, pool: str = "max",
                 group_select: bool = True, body=None, **stage2):
        if body is not None and (not group_select or stage2.get("read") is not None):
            raise KvtoolError("quantized kept tokens (k / v below 16) need select=snapkv++ without read")
        self.obs, self.kernel, self.pool, self.group_select, self.make_body = obs, kernel, pool, group_select, body
        super().__init__(budget, dtype, **stage2)

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, obs: int | None = None, kernel: int | None = None, body=None,
                    **_):
        """obs / kernel: this layer's calibrated defaults (the profile's snapkv section), used when the policy
        leaves them unset; body: a factory of the store that keeps the selected tokens (a QuantizedStore with k / v
        below 16; None: they stay here, 16-bit)."""
        return cls(policy.budget, dtype, policy.obs or obs or OBS, policy.kernel or kernel or KERNEL, policy.pool,
                   policy.select == "snapkv++", body, read=policy.read, page=policy.page, rdims=policy.rdims)

    def reset(self) -> None:
        super().reset()
        self.obs_q = self.obs_pos = None              # the last `obs` queries seen [B, h·G, ≤obs, D], positions
        self.scaling = None
        self.selected = False
        self.multi = False                            # a multi-token forward was seen
        self.lazy = True                              # may select at a decode step (False inside kvtool's prefill)
        self.body = None                              # after the selection with `make_body`: the store holding the
        self.offset = 0                               # kept tokens, at positions (real - offset), consecutive

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.obs_q) + (self.body.nbytes() if self.body is not None else 0)

    def read_nbytes(self) -> int:
        return self.body.nbytes() if self.body is not None else super().read_nbytes()

    def tensors(self):
        return super().tensors() + ([self.obs_q] if self.obs_q is not None else []) + \
            (self.body.tensors() if self.body is not None else [])

    def __len__(self) -> int:
        return len(self.body) if self.body is not None else super().__len__()

    # ---- after a selection into a body (quantized kept tokens): everything goes to the body -----------------------
    def append(self, k, v, pos):
        if self.body is None:
            return super().append(k, v, pos)
        self.body.append(k, v, pos - self.offset)
        self.seen = int(pos[-1]) + 1

    def attend(self, q, qpos, scaling, new=None):
        if (not self.selected and self.lazy and q.shape[2] == 1 and self.multi and len(self)
                and int(qpos[0]) >= self.seen):
            self.finish_prefill()                     # model.generate without kvtool's prefill: the prompt ended
        if self.body is None:
            return super().attend(q, qpos, scaling, new)
        return self.body.attend(q, qpos - self.offset, scaling, new)

    def select_batch(self, idx):
        super().select_batch(idx)
        if self.body is not None:
            self.body.select_batch(idx)

    def crop_refusal(self, end):
        if self.body is not None:
            return super().crop_refusal(end) or self.body.crop_refusal(end - self.offset)
        return super().crop_refusal(end)

    def crop(self, end):
        if self.body is None:
            return super().crop(end)
        self.body.crop(end - self.offset)
        self.seen = min(self.seen, end)

    def _into_body(self) -> None:
        """Move the kept tokens [B, h, m, D] into a fresh body store at positions 0..m-1 (every later query sees them
        all, and the new tokens continue at m, m+1, ...: only differences of positions matter to the body, whose
        keys are post-RoPE). The kept positions stay here (`pos`, the prompt's only)."""
        m = len(self)
        self.offset = self.seen - m
        body = self.make_body()
        body.append(self.k, self.v, torch.arange(m, device=self.k.device))
        self.k = self.v = None
        self.body = body

    def adopt_refusal(self, other) -> str | None:
        """Why this (empty) store cannot take over `other`'s prefill exactly (None: it can; see `adopt`)."""
        if not isinstance(other, SnapKVStore):
            return f"the source holds a {other.name} store, not a snapkv one"
        if len(self) or self.seen or self.selected:
            return "the adopting cache is not fresh (it has seen tokens)"
        if not other.holds_every_token() or other.body is not None:
            return "the source's snapkv store has already selected (call prefill with finish=False)"
        if other.dtype != self.dtype:
            return f"the source holds its tokens in {other.dtype}, this store in {self.dtype}"
        if other.obs < self.obs:
            return (f"the source recorded the last {other.obs} queries, this store needs {self.obs} (record the "
                    "largest obs of the group: CompressedCache.widen_obs)")
        return None

    def adopt(self, other: "SnapKVStore") -> None:
        """Take over `other`'s state at the end of a prompt it has not selected from yet: every token [B, h, n, D]
        and its positions, and the last `self.obs` of the queries it recorded (a suffix of its own window, which is at
        least as long: exactly the window this store would have recorded over the same chunks). Refused (KvtoolError)
        where that would not be exact (`adopt_refusal`). Then `finish_prefill` selects with this store's own budget,
        obs, kernel, pool, per-group or per-head choice, and body."""
        reason = self.adopt_refusal(other)
        if reason:
            raise KvtoolError(f"cannot adopt this prefill: {reason}")
        self._adopt_tokens(other)
        if other.obs_q is not None:
            self.obs_q = other.obs_q[:, :, -self.obs:].clone()         # [B, h·G, ≤obs, D]
            self.obs_pos = other.obs_pos[-self.obs:].clone()            # [≤obs]
        self.scaling, self.multi, self.lazy = other.scaling, other.multi, other.lazy

    def before_attend(self, q, qpos, scaling, new) -> None:
        if self.selected:
            return
        self.multi = self.multi or q.shape[2] > 1
        self.scaling = scaling
        qs = q.detach()
        if self.obs_q is not None and int(qpos[0]) == int(self.obs_pos[-1]) + 1:
            qs, qpos = torch.cat([self.obs_q, qs], 2), torch.cat([self.obs_pos, qpos])
        self.obs_q, self.obs_pos = qs[:, :, -self.obs:].clone(), qpos[-self.obs:].clone()

    def finish_prefill(self) -> None:
        """Select now (the prompt ended): keep the budget's tokens per KV head (per query head for plain SnapKV)."""
        self.lazy = True
        if self.selected or not len(self):
            return
        self.selected = True
        n = len(self)
        keep = budget_tokens(self.budget, n)
        q, qpos = self.obs_q, self.obs_pos
        self.obs_q = self.obs_pos = None
        if keep >= n:                                 # everything fits: nothing is dropped
            if self.make_body is not None:
                self._into_body()
            return
        kpos = self.pos[0, 0]
        inside = qpos <= kpos[-1]                     # queries of held tokens (the window's own)
        q, qpos = q[:, :, inside], qpos[inside]
        window = min(q.shape[2], n)
        votes = window_votes(q, self.k, qpos, kpos, self.scaling)                         # [B, h, G, n]
        idx = snap_select(votes, n, window, keep, self.kernel, self.pool, not self.group_select)
        if not self.group_select:                     # one copy of the KV head per query head
            g = self.group
            self.k, self.v = self.k.repeat_interleave(g, 1), self.v.repeat_interleave(g, 1)
            self.pos = self.pos.repeat_interleave(g, 1)
            self.per_query = True
        self.keep(idx)
        if self.make_body is not None:
            self._into_body()
