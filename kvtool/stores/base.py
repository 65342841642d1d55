"""The store interface of the runtime, the store registry, and the partial-attention algebra every store uses.

A layer of a `CompressedCache` is a composition of stores, each owning a group of KV heads and one way of keeping
their tokens. Every store implements

    store.append(k, v, pos)               # new tokens k, v [B, h, t, D] at absolute positions pos [t] (long)
    store.attend(q, qpos, scaling, new)   # -> (out [B, h·G, t, D] float32, lse [B, h·G, t] float32)
    store.nbytes()                        # bytes really held (tensors + the per-layer constants reading needs)
    store.reset()
    store.visible(qpos, kpos)             # bool [t, n]: which positions a query may see (causal by default)

`attend` is a partial result over what the store holds (and over `new`, the query chunk's own keys/values, read
exactly, which the layer appends only after the attention call): the attention merges the partials of all stores of
a head group by log-sum-exp (`merge`), the same split-K merge as cupy_kernels' fused decode kernel, so a store may
hold any subset of positions, in any form. A query that sees no key gets out = 0, lse = -inf (never NaN).

A store declares the policy fields it reads (`reads`); the fields themselves are registered once, in the module of
the store that owns them (kvtool.policy.register_field).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from kvtool.errors import KvtoolError
from kvtool.scores import Scaling, partial, softcap_, softmax_partial  # noqa: F401  (the score algebra; re-exported)
from kvtool.windows import causal_allowed

STORES: dict[str, type["Store"]] = {}


def register(name: str):
    """Class decorator: add a store to the registry (the test matrix runs over every registered store)."""
    def wrap(cls):
        cls.name = name
        STORES[name] = cls
        return cls
    return wrap


class Store:
    """Base class; see the module docstring. Subclasses set `reads` and implement the five methods."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()          # policy fields this store reads
    exact: ClassVar[bool] = True                   # False: reads back an approximation (quantized, low-rank, ...)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, qpos: torch.Tensor, scaling: float,
               new: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return causal_allowed(qpos, kpos)

    def __len__(self) -> int:                     # tokens held
        raise NotImplementedError

    # ---- generate's batch and rollback calls (beam search, num_return_sequences, assisted decoding) -------------

    record_past = False                            # True: keep tokens a window would drop until the next crop

    def select_batch(self, idx: torch.Tensor) -> None:
        """Keep batch rows idx [B'] (long, repeats allowed) of everything held, in that order: beam search's
        reorder, num_return_sequences' repeat, a batch selection."""
        raise KvtoolError(f"the {self.name} store cannot reorder its batch (beam search, num_return_sequences)")

    def rollback_refusal(self) -> str | None:
        """Why the store can never drop tokens (None: it can, as far as it still holds them; see crop_refusal)."""
        return f"the {self.name} store cannot drop tokens"

    def crop_refusal(self, end: int) -> str | None:
        """Why the store cannot drop every position ≥ end and be exactly as if it had never seen them (None: it
        can). Checked on every store of a cache before any store crops."""
        return self.rollback_refusal() if end < getattr(self, "seen", 0) else None

    def crop(self, end: int) -> None:
        """Drop positions ≥ end (after crop_refusal(end) said None); with end == seen only trim what `record_past`
        kept."""
        reason = self.crop_refusal(end)
        if reason:
            raise KvtoolError(reason)


def batch_rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Rows idx [B'] of t [B, ...] (None stays None)."""
    return None if t is None else t.index_select(0, idx.to(t.device))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of partial results [(out [B, hq, t, D], lse [B, hq, t])] over disjoint key sets → the
    result over their union (exact: softmax over a union = the lse-weighted mix of the parts' softmaxes)."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])                                    # [P, B, hq, t]
    m = lse.amax(0).clamp_min_(-1e30)                                           # [B, hq, t]
    w = (lse - m).exp_()                                                        # [P, B, hq, t]
    total = w.sum(0)
    out = parts[0][0] * w[0].unsqueeze(-1)
    for i in range(1, len(parts)):
        out.addcmul_(parts[i][0], w[i].unsqueeze(-1))
    out.div_(total.clamp_min(1e-30).unsqueeze(-1))
    return out, total.log_().add_(m)


def empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial result over no keys: out 0, lse -inf."""
    b, hq, t, d = q.shape
    return q.new_zeros(b, hq, t, d, dtype=torch.float32), q.new_full((b, hq, t), -math.inf, dtype=torch.float32)


def storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the unquantized parts for a policy `dtype` field."""
    if name == "auto":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    if name == "model":
        return model_dtype
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def cat_float(sink: torch.Tensor, held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """sink | held tokens (16-bit) | the new tokens read exactly → float32 [B, h, ·, D] along dim 2: one cat when `new`
    is float32 (the 16-bit parts are promoted exactly), else the 16-bit parts and `new` are each made float32."""
    if new.dtype == torch.float32:
        return torch.cat([sink, held, new], 2)
    return torch.cat([torch.cat([sink, held], 2).float(), new.float()], 2)


def attend_sixteen_bit(store, q: torch.Tensor, qpos: torch.Tensor, scaling: float, new, parts: list) -> tuple:
    """Finish `attend` of a store laid out as 16-bit sink | body | 16-bit buffer (quantized, lowrank): add the partial
    over its 16-bit sink and buffer (+ `new`, the chunk's own k, v, read exactly) to `parts`, the body's partials, and
    merge. q [B, h·G, t, D]; the store has sink_k/sink_v, buf_k/buf_v [B, h, ·, D], `first` and `seen` positions."""
    t = q.shape[2]
    if new is not None and t == 1 and len(store) and int(qpos[0]) >= store.seen:
        # a decode step: every held token and the new one are visible; one 16-bit part, no mask
        k = cat_float(store.sink_k, store.buf_k, new[0])
        v = cat_float(store.sink_v, store.buf_v, new[1])
        parts.append(partial(q, k, v, scaling))
        return merge(parts)
    ks, vs, kpos = [], [], []
    if len(store):
        ks.append(torch.cat([store.sink_k, store.buf_k], 2))
        vs.append(torch.cat([store.sink_v, store.buf_v], 2))
        n_s, n_b = store.sink_k.shape[2], store.buf_k.shape[2]
        kpos += [torch.arange(store.first, store.first + n_s, device=q.device),
                 torch.arange(store.seen - n_b, store.seen, device=q.device)]
    if new is not None:
        ks.append(new[0])
        vs.append(new[1])
        kpos.append(qpos)
    if kpos:
        kpos = torch.cat(kpos)
        allowed = store.visible(qpos, kpos)
        k = torch.cat([x.float() for x in ks], 2)
        v = torch.cat([x.float() for x in vs], 2)
        parts.append(partial(q, k, v, scaling, None if bool(allowed.all()) else allowed))
    return merge(parts) if parts else empty_partial(q)


def append_sixteen_bit(store, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, to_body,
                       flushes: bool = True) -> None:
    """`append` of a store laid out as 16-bit sink | body | 16-bit buffer (quantized, lowrank): new tokens k, v
    [B, h, t, D] at consecutive positions pos [t] fill the sink, then the buffer; once the buffer holds `flush` tokens
    beyond `n_buffer` (and `flushes`), its oldest tokens go to the body through `to_body(xk, xv, start)`, block by
    block (the open block first), so no block outgrows `store.block`."""
    if store.sink_k is None:
        b, h, _, d = k.shape
        store.sink_k = k.new_zeros(b, h, 0, d, dtype=store.dtype)
        store.sink_v, store.buf_k, store.buf_v = store.sink_k, store.sink_k, store.sink_k
        store.first = int(pos[0])
    take = max(0, min(k.shape[2], store.n_sink - store.sink_k.shape[2]))         # tokens that are still sink tokens
    if take:
        store.sink_k = torch.cat([store.sink_k, k[:, :, :take].to(store.dtype)], 2)
        store.sink_v = torch.cat([store.sink_v, v[:, :, :take].to(store.dtype)], 2)
    store.buf_k = torch.cat([store.buf_k, k[:, :, take:].to(store.dtype)], 2)
    store.buf_v = torch.cat([store.buf_v, v[:, :, take:].to(store.dtype)], 2)
    store.seen = int(pos[-1]) + 1
    if flushes and store.buf_k.shape[2] >= store.n_buffer + store.flush:
        cut = store.buf_k.shape[2] - store.n_buffer
        start = store.first + store.sink_k.shape[2] + store.n_body
        done = 0
        while done < cut:                                                  # fill the open block, then new ones
            last = store.blocks[-1] if store.blocks else None
            room = store.block - last.n if last is not None and last.n < store.block else store.block
            n = min(room, cut - done)
            to_body(store.buf_k[:, :, done:done + n], store.buf_v[:, :, done:done + n], start + done)
            done += n
        store.buf_k = store.buf_k[:, :, cut:].clone()
        store.buf_v = store.buf_v[:, :, cut:].clone()


def select_sixteen_bit(store, idx: torch.Tensor, blocks) -> None:
    """`select_batch` of a store laid out as 16-bit sink | body | 16-bit buffer: the sink and buffer here, each body
    block through `blocks(block)` (the store's own layout)."""
    store.sink_k, store.sink_v = batch_rows(store.sink_k, idx), batch_rows(store.sink_v, idx)
    store.buf_k, store.buf_v = batch_rows(store.buf_k, idx), batch_rows(store.buf_v, idx)
    for blk in store.blocks:
        blocks(blk)


def sixteen_bit_crop_refusal(store, end: int) -> str | None:
    """A sink | body | buffer store can drop positions ≥ end while they all lie in its 16-bit buffer (or sink): the
    quantized / projected body is never rolled back."""
    if end >= store.seen or store.sink_k is None:
        return None
    if store.seen - end <= store.buf_k.shape[2] or (store.n_body == 0 and end >= store.first):
        return None
    return (f"the {store.name} store would have to drop {store.seen - end} tokens but only its last "
            f"{store.buf_k.shape[2]} are still 16-bit (older ones are already in its compressed body); "
            "raise the policy's `buffer`")


class SixteenBitRollback:
    """Rollback of a store laid out as 16-bit sink | body | 16-bit buffer (quantized, lowrank): it can drop what its
    16-bit buffer still holds, exactly, and refuses (one line) a crop into the body."""

    def rollback_refusal(self):
        return None

    def crop_refusal(self, end):
        return sixteen_bit_crop_refusal(self, end)

    def crop(self, end):
        crop_sixteen_bit(self, end)


def crop_sixteen_bit(store, end: int) -> None:
    """Drop positions ≥ end from the buffer (then the sink); see sixteen_bit_crop_refusal."""
    if end >= store.seen or store.sink_k is None:
        return
    n = store.seen - end
    cut = min(n, store.buf_k.shape[2])
    store.buf_k = store.buf_k[:, :, :store.buf_k.shape[2] - cut].clone()
    store.buf_v = store.buf_v[:, :, :store.buf_v.shape[2] - cut].clone()
    keep = max(0, end - store.first)                                       # sink tokens that stay (empty body)
    if keep < store.sink_k.shape[2]:
        store.sink_k, store.sink_v = store.sink_k[:, :, :keep].clone(), store.sink_v[:, :, :keep].clone()
    store.seen = end
