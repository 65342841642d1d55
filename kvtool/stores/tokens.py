"""Token-selecting stores' common part: a 16-bit store of an arbitrary kept subset of tokens, each KV head with its
own positions, and RocketKV's stage 2 (arXiv 2502.14051): sparse decode over pages of keys.

A `TokenStore` holds k, v [B, h', n, D] in `dtype` and the absolute position of every kept token, pos [B, h', n]
(int32), sorted by position; h' is the store's KV heads (h), or its query heads (h·G) for plain per-query-head
selection (the original SnapKV, which keeps G copies per KV head: its `nbytes` counts them). Before its selection a
store keeps every token (positions 0..seen-1 for every head); subclasses decide what to drop (kvtool/stores/snapkv.py
at the end of the prompt, kvtool/stores/h2o.py at every append). Every kept token lies before every later query, so
after a selection nothing needs a mask but the new chunk's own causal one.

Stage 2 (policy `read`): at a decode step the store reads only some pages of its keys. Keys are grouped in pages of
`page` consecutive kept tokens (in kept order); each full page carries its element-wise min and max [B, h', P, D]
(`pmin`, `pmax`, kept incrementally as pages fill). The query's `rdims` largest head dimensions by Σ|q| over the
KV group are scored; a page's score is the upper bound Σ_i max(q_i·min_i, q_i·max_i) over those dims, summed over
the group's query heads (with every dim it is ≥ q·k for every key of the page: `page_upper_bound`); the top pages
(`read` tokens' worth) and the open, not yet full page are read exactly. `read_nbytes()` counts what that step read:
the chosen dims of every page's min/max plus the chosen tokens' keys and values.
"""

from __future__ import annotations

import math

import torch

from kvtool.errors import KvtoolError
from kvtool.policy import Field, _count, _number, register_field, simple
from kvtool.scores import softcap_
from kvtool.stores.base import Store, batch_rows, empty_partial, tensor_bytes

SELECT = ("off", "snapkv++", "snapkv", "h2o")


def parse_budget(key: str, text: str) -> int | float:
    """`512` (tokens, a whole number ≥ 1) or `0.25` (a fraction in (0, 1] of the tokens seen; a decimal point)."""
    if "." in text or "e" in text.lower():
        f = _number(key, text)
        if not 0.0 < f <= 1.0:
            raise KvtoolError(f"policy field {key!r}: fraction {text} is outside (0, 1]")
        return f
    return _count(key, text, 1)


def budget_tokens(budget: int | float, n: int) -> int:
    """Tokens a budget keeps of n (a fraction rounds up; at least 1)."""
    return min(n, budget if isinstance(budget, int) else max(1, math.ceil(budget * n)))


def _show_budget(key: str):
    def show(values: dict) -> str | None:
        b = values[key]
        return None if b is None else f"{b:g}" if isinstance(b, float) else str(b)
    return show


def _select(text: str) -> str:
    if text not in SELECT:
        raise KvtoolError(f"policy field 'select': {text!r} is not one of {', '.join(SELECT)}")
    return text


register_field(
    simple("select", _select, "off", "`off`, `snapkv++`, `snapkv`, `h2o`",
           "Token selection for retrieval heads (all heads with `heads=all`): `snapkv++` keeps the `budget` tokens the "
           "prompt's last `obs` queries attend most, pooled and summed over each KV group (one selection per KV head, "
           "RocketKV's SnapKV++); `snapkv` selects per query head (the original SnapKV, G copies per KV head); `h2o` "
           "keeps heavy hitters by accumulated attention + a recent window, evicting as tokens arrive. Kept tokens "
           "stay 16-bit.", "snapkv, h2o"),
    Field("budget", lambda text, _m: {"budget": parse_budget("budget", text)}, {"budget": None},
          "tokens (`512`) or a fraction (`0.25`)",
          "Tokens a selecting head keeps (the observation window / recent window included); a fraction of the "
          "tokens seen. Needed with `select`.", "snapkv, h2o", _show_budget("budget")),
    Field("read", lambda text, _m: {"read": parse_budget("read", text)}, {"read": None},
          "tokens (`64`) or a fraction (`0.125`) of those kept",
          "RocketKV stage 2: tokens a decode step reads from a selecting head's kept keys (whole pages of `page`, "
          "picked by an upper bound on q·k from per-page key min/max over the `rdims` largest query dims), plus the "
          "open page. Unset: every kept token is read.", "snapkv"),
    simple("page", lambda t: _count("page", t, 1), 16, "tokens", "Tokens per page of stage 2 (`read`).", "snapkv"),
    simple("rdims", lambda t: _count("rdims", t, 1), None, "head dims",
           "Head dims stage 2 scores pages with (the largest Σ|q| over the KV group). Unset: half of head_dim.",
           "snapkv"),
)


class TokenStore(Store):
    """See the module docstring. Subclasses call `keep(idx)` to drop every token but idx [B, h', m] (indices into
    the kept tokens, increasing)."""

    reads = ("select", "budget", "read", "page", "rdims", "dtype")

    def __init__(self, budget: int | float, dtype: torch.dtype, read: int | float | None = None, page: int = 16,
                 rdims: int | None = None):
        if budget is None:
            raise KvtoolError(f"policy select={self.name} needs a budget (e.g. budget=512 or budget=0.25)")
        self.budget, self.dtype, self.read_budget, self.page, self.rdims = budget, dtype, read, page, rdims
        self.reset()

    def reset(self) -> None:
        self.k = self.v = self.pos = None                 # [B, h', n, D] ×2, [B, h', n] int32
        self.seen = 0
        self.group = 1                                    # query heads per KV head (from the first attend)
        self.per_query = False                            # h' = h·G (after a plain SnapKV selection)
        self.selected_at = 0                              # tokens before this position may have been dropped
        self.pmin = self.pmax = None                      # [B, h', P, D] for stage 2
        self.last_read = None                             # bytes the last decode step read
        self.selected = False                             # the prompt ended (stage 2 reads pages from then on)

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    # ---- holding -------------------------------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """New tokens of the h KV heads [B, h, t, ·] as the store's heads (repeated per query head when per_query)."""
        return x.repeat_interleave(self.group, 1) if self.per_query else x

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t] (consecutive): kept (subclasses may then drop some)."""
        k, v = self._heads(k).to(self.dtype), self._heads(v).to(self.dtype)
        p = pos.to(torch.int32).view(1, 1, -1).expand(k.shape[0], k.shape[1], -1)
        if self.k is None:
            self.k, self.v, self.pos = k, v, p.contiguous()
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.pos = torch.cat([self.pos, p], 2)
        self.seen = int(pos[-1]) + 1
        if self.read_budget is not None:
            self._pages_fill()

    def keep(self, idx: torch.Tensor) -> None:
        """Keep tokens idx [B, h', m] (increasing) of those held; the rest are freed (new tensors, not views)."""
        d = self.k.shape[-1]
        full = idx.unsqueeze(-1).expand(-1, -1, -1, d)
        self.k, self.v = self.k.gather(2, full), self.v.gather(2, full)
        self.pos = self.pos.gather(2, idx)
        self.selected_at = self.seen
        self.pmin = self.pmax = None
        if self.read_budget is not None:
            self._pages_fill()

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.pmin, self.pmax)

    def read_nbytes(self) -> int:
        """Bytes the last attention call read from this store: what the sparse decode step chose, else every kept
        key and value."""
        return tensor_bytes(self.k, self.v) if self.last_read is None else self.last_read

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.pos, self.pmin, self.pmax) if t is not None]

    # ---- a shared prefill (kvtool bench --share-prefill) -----------------------------------------------------------
    def holds_every_token(self) -> bool:
        """True before any selection or drop: positions 0..seen-1 on every head, one copy per KV head."""
        return not self.selected and not self.per_query and self.selected_at == 0 and len(self) == self.seen

    def _adopt_tokens(self, other: "TokenStore") -> None:
        """Copy another store's held tokens (every token of its prompt so far; the caller checks) into this empty
        store: k, v [B, h, n, D], pos [B, h, n], seen, group; the stage-2 page summaries are rebuilt from the keys
        (min/max are exact, so they equal those kept incrementally as pages filled)."""
        if other.dtype != self.dtype:
            raise KvtoolError(f"cannot adopt a prefill held in {other.dtype} by a {self.name} store of {self.dtype}")
        self.reset()
        if other.k is not None:
            self.k, self.v, self.pos = other.k.clone(), other.v.clone(), other.pos.clone()
        self.seen, self.group = other.seen, other.group
        if self.read_budget is not None and self.k is not None:
            self._pages_fill()

    def read(self):
        """(k, v, positions [n]) when every head keeps the same positions (before any selection, or a budget that
        kept everything); else refused."""
        if not bool((self.pos == self.pos[:1, :1]).all()):
            raise KvtoolError(f"the {self.name} store's heads keep different positions")
        return self.k, self.v, self.pos[0, 0].long()

    def select_batch(self, idx):
        self.k, self.v, self.pos = batch_rows(self.k, idx), batch_rows(self.v, idx), batch_rows(self.pos, idx)
        self.pmin, self.pmax = batch_rows(self.pmin, idx), batch_rows(self.pmax, idx)

    def rollback_refusal(self):
        return None

    def crop_refusal(self, end):
        if end < self.selected_at:
            return (f"the {self.name} store already chose which of the first {self.selected_at} tokens to keep; it "
                    f"cannot go back to {end}")
        return None

    def crop(self, end):
        """Drop positions ≥ end (all after the selection: every head holds them, at its end)."""
        if self.k is None or end >= self.seen:
            return
        n = int((self.pos[0, 0] < end).sum())
        self.k, self.v, self.pos = self.k[:, :, :n].clone(), self.v[:, :, :n].clone(), self.pos[:, :, :n].clone()
        self.seen = end
        if self.pmin is not None and self.pmin.shape[2] * self.page > n:
            self.pmin, self.pmax = self.pmin[:, :, :n // self.page].clone(), self.pmax[:, :, :n // self.page].clone()

    # ---- reading -------------------------------------------------------------------------------------------------
    def scores(self, q, qpos, scaling, new=None):
        """(s [B, h', G', t, n(+t)] scaled, capped, masked float32 scores; k, v float32 [B, h', n(+t), D]) of
        q [B, h·G, t, D] over the held tokens (+ the new chunk, causal among itself)."""
        b, hq, t, d = q.shape
        ks, vs = [], []
        if self.k is not None:
            ks.append(self.k.float())
            vs.append(self.v.float())
        if new is not None:
            ks.append(self._heads(new[0]).float())
            vs.append(self._heads(new[1]).float())
        k, v = torch.cat(ks, 2), torch.cat(vs, 2)
        h = k.shape[1]
        g = hq // h
        s = torch.matmul(q.float().view(b, h, g, t, d), k.unsqueeze(2).transpose(-1, -2))     # [B, h', G', t, n]
        softcap_(s.mul_(scaling), scaling)
        held = len(self)
        if held and int(self.pos[:, :, -1].max()) > int(qpos[0]):                       # never after a selection
            s[..., :held].masked_fill_(~(self.pos.unsqueeze(2).unsqueeze(3) <= qpos.view(1, 1, 1, -1, 1)),
                                       -math.inf)
        if new is not None and t > 1:
            causal = qpos.view(-1, 1) >= qpos.view(1, -1)                                   # [t, t]
            s[..., held:].masked_fill_(~causal, -math.inf)
        return s, k, v

    def attend(self, q, qpos, scaling, new=None):
        """q [B, h·G, t, D] → (out [B, h·G, t, D], lse [B, h·G, t]) over the held tokens and the new chunk."""
        if new is not None:
            self.group = q.shape[1] // new[0].shape[1]
        elif self.k is not None and not self.per_query:
            self.group = q.shape[1] // self.k.shape[1]
        self.last_read = None
        self.before_attend(q, qpos, scaling, new)
        if (self.read_budget is not None and q.shape[2] == 1 and new is not None and len(self)
                and int(qpos[0]) >= self.seen and self.selected):
            return self.sparse_decode(q, scaling, new)
        if self.k is None and new is None:
            return empty_partial(q)
        s, k, v = self.scores(q, qpos, scaling, new)
        return self.finish(s, v, q.shape)

    def finish(self, s, v, shape, probs=None):
        """Softmax of scores s [B, h', G', t, n] over values v [B, h', n, D] → (out, lse) in the query layout;
        `probs(p)` sees the probabilities [B, h', G', t, n] (H2O's accumulation)."""
        b, hq, t, d = shape
        lse = torch.logsumexp(s, -1, keepdim=True)                                          # [B, h', G', t, 1]
        p = (s - lse.clamp_min(-1e30)).exp_()
        if probs is not None:
            probs(p)
        out = torch.matmul(p, v.unsqueeze(2))                                               # [B, h', G', t, D]
        return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)

    def before_attend(self, q, qpos, scaling, new) -> None:
        """Hook for subclasses (SnapKV records its observation window here)."""

    # ---- stage 2: pages ------------------------------------------------------------------------------------------
    def _pages_fill(self) -> None:
        """Summarise every page that filled since the last call (min/max over its tokens) [B, h', P, D]."""
        n, p = len(self), self.page
        done = 0 if self.pmin is None else self.pmin.shape[2]
        full = n // p
        if full <= done:
            return
        kk = self.k[:, :, done * p:full * p]
        kk = kk.reshape(kk.shape[0], kk.shape[1], full - done, p, kk.shape[-1])
        lo, hi = kk.amin(3), kk.amax(3)
        self.pmin = lo if self.pmin is None else torch.cat([self.pmin, lo], 2)
        self.pmax = hi if self.pmax is None else torch.cat([self.pmax, hi], 2)

    def sparse_decode(self, q, scaling, new):
        """A decode step reading `read` tokens' worth of pages (+ the open page) exactly (see the module docstring).
        q [B, h·G, 1, D]."""
        b, hq, _, d = q.shape
        n, p = len(self), self.page
        pages = 0 if self.pmin is None else self.pmin.shape[2]
        want = budget_tokens(self.read_budget, n)
        take = min(pages, math.ceil(want / p))
        item = self.k.element_size()
        h = self.k.shape[1]
        g = hq // h
        if take >= pages:                                    # every page: the dense read
            self.last_read = tensor_bytes(self.k, self.v)
            s, k, v = self.scores(q, torch.tensor([self.seen], device=q.device), scaling, new)
            return self.finish(s, v, q.shape)
        r = min(d, self.rdims or max(1, d // 2))
        qg = q.float().view(b, h, g, d)                                                     # [B, h', G', D]
        dims = qg.abs().sum(2).topk(r, -1).indices                                          # [B, h', r]
        ub = page_upper_bound(qg, self.pmin, self.pmax, dims).sum(2)                        # [B, h', P]
        top = ub.topk(take, -1).indices.sort(-1).values                                     # [B, h', take]
        idx = (top.unsqueeze(-1) * p + torch.arange(p, device=q.device)).flatten(2)         # [B, h', take·p]
        tail = torch.arange(pages * p, n, device=q.device).view(1, 1, -1).expand(b, h, -1)
        idx = torch.cat([idx, tail], 2)
        full = idx.unsqueeze(-1).expand(-1, -1, -1, d)
        k = torch.cat([self.k.gather(2, full).float(), self._heads(new[0]).float()], 2)
        v = torch.cat([self.v.gather(2, full).float(), self._heads(new[1]).float()], 2)
        s = torch.matmul(qg.unsqueeze(3), k.unsqueeze(2).transpose(-1, -2))                 # [B, h', G', 1, m]
        softcap_(s.mul_(scaling), scaling)
        self.last_read = b * h * (2 * pages * r * item + idx.shape[2] * 2 * d * item)
        return self.finish(s, v, q.shape)


def page_upper_bound(qg: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor, dims: torch.Tensor | None = None):
    """Upper bound of q·k over each page from its key min/max: qg [B, h, G, D], pmin/pmax [B, h, P, D], dims
    [B, h, r] (None: all D) → [B, h, G, P] = Σ_i max(q_i·min_i, q_i·max_i) over the dims (Quest / RocketKV; with
    every dim it is ≥ q·k for every key of the page)."""
    if dims is not None:
        g, p = qg.shape[2], pmin.shape[2]
        qg = qg.gather(-1, dims.unsqueeze(2).expand(-1, -1, g, -1))                          # [B, h, G, r]
        pmin = pmin.gather(-1, dims.unsqueeze(2).expand(-1, -1, p, -1))                      # [B, h, P, r]
        pmax = pmax.gather(-1, dims.unsqueeze(2).expand(-1, -1, p, -1))
    lo = qg.unsqueeze(3) * pmin.float().unsqueeze(2)                                        # [B, h, G, P, r]
    hi = qg.unsqueeze(3) * pmax.float().unsqueeze(2)
    return torch.maximum(lo, hi).sum(-1)
