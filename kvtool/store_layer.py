"""The layers of a `CompressedCache` (kvtool/cache.py): a `StoreLayer` is one transformers cache layer made of stores
(kvtool/stores/), each over a `HeadGroup` of KV heads. `update()` keeps a chunk's exact keys/values until the
"kvtool" attention call (kvtool.attention.attend_layer) reads them and appends them to the stores; the batch and
rollback calls of generate's strategies (beam search, assisted decoding) are passed on to every store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from kvtool.attention import KVTOOL_ATTENTION
from kvtool.errors import KvtoolError
from kvtool.stores import Store


@dataclass
class HeadGroup:
    """One store of a layer and the KV heads it owns (None: all of them) and their query heads [h·G] (None: all)."""
    store: Store
    kv_heads: torch.Tensor | None
    q_heads: torch.Tensor | None


class StoreLayer(CacheLayerMixin):
    """One layer: its stores, each over a group of KV heads. `update()` keeps the new tokens (exact) until the
    attention call, which reads them exactly and then appends them to the stores (kvtool.attention.attend_layer)."""

    def __init__(self, groups: list[HeadGroup], sliding: bool = False, backend: str = "torch"):
        super().__init__()
        self.groups, self.is_sliding, self.backend = groups, sliding, backend
        self.seen = 0                                                      # tokens seen, not tokens held
        self.pending = None                                                # (k, v, pos) of the last update
        self.uncropped = False                                             # an update since the last crop

    @property
    def stores(self) -> list[Store]:
        return [g.store for g in self.groups]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, H_kv, t, D] of the new tokens. Returns them tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = getattr(self, "model_config", None)
        if cfg is not None and cfg._attn_implementation != KVTOOL_ATTENTION:
            raise KvtoolError(f"the model runs the {cfg._attn_implementation!r} attention, which cannot read a "
                              "CompressedCache (it was switched after the cache was built): call "
                              "kvtool.use_kvtool_attention(model) before using the cache again")
        if self.uncropped and self.record_past:
            # two forwards without a crop between: no speculative loop runs (any more); free what recording kept
            self.record_past = False
            for s in self.stores:
                s.crop(self.seen)
        self.uncropped = True
        held = self.held_batch
        if held is not None and key_states.shape[0] != held:
            raise KvtoolError(f"the cache holds {held} sequence(s) but this call brings {key_states.shape[0]}; a "
                              "cache continues the batch it was filled with (cache.batch_repeat_interleave(n) "
                              "repeats it, e.g. for num_return_sequences on a cached prompt)")
        t = key_states.shape[2]
        pos = torch.arange(self.seen, self.seen + t, device=key_states.device)
        self.pending = (key_states, value_states, pos)
        self.seen += t
        key_states.kvtool_layer = self
        return key_states, value_states

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stores)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset); transformers 5.0 passes cache_position [t] instead of the length t."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length                                  # the abstract name in transformers 5.0

    def reset(self) -> None:
        for s in self.stores:
            s.reset()
        self.pending, self.uncropped = None, False
        self.seen, self.is_initialized = 0, False

    # ---- generate's batch and rollback calls (transformers' Cache API) ------------------------------------------

    @property
    def held_batch(self) -> int | None:
        """Sequences the stores hold (None before the first token)."""
        for s in self.stores:
            for name in ("sink_k", "k", "v"):
                t = getattr(s, name, None)
                if isinstance(t, torch.Tensor):
                    return t.shape[0]
        return None

    def select_batch(self, idx: torch.Tensor) -> None:
        """Keep batch rows idx [B'] (long) in every store, in that order (rows may repeat)."""
        if self.held_batch is None:
            return
        idx = idx.long().view(-1)
        for s in self.stores:
            s.select_batch(idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues the beam beam_idx[i]."""
        self.select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.held_batch is not None:
            self.select_batch(torch.arange(self.held_batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        self.select_batch(indices.nonzero().view(-1) if indices.dtype == torch.bool else indices)

    @property
    def is_croppable(self) -> bool:                                       # type: ignore[override]
        """Whether every store can drop tokens it still holds exactly (assisted / prompt-lookup decoding)."""
        return all(s.rollback_refusal() is None for s in self.stores)

    def activate_past_recording(self, **kwargs) -> None:
        """Called by generate before assisted decoding (transformers 5.25 passes options such as
        `recurrent_states_to_keep`, which concern recurrent layers and are ignored here): window and sliding stores keep the tokens they would free
        until the next `crop`, so rejected draft tokens can be dropped exactly. Speculative decoding crops after
        every forward; a second forward without a crop ends the recording (and frees what it kept)."""
        self.record_past, self.uncropped = True, False

    @property
    def record_past(self) -> bool:
        return any(s.record_past for s in self.stores)

    @record_past.setter
    def record_past(self, on: bool) -> None:
        for s in self.stores:
            s.record_past = bool(on)

    def crop_end(self, tokens_to_remove: int) -> int:
        """The number of tokens left after crop(tokens_to_remove): negative removes that many, 0 removes none
        (transformers 5.24), positive is the length to keep (transformers 5.0's convention)."""
        if tokens_to_remove <= 0:
            return max(0, self.seen + tokens_to_remove)
        return min(self.seen, tokens_to_remove)

    def crop_refusal(self, end: int) -> str | None:
        for s in self.stores:
            reason = s.crop_refusal(end)
            if reason:
                return reason
        return None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (rejected draft tokens); refused (KvtoolError, nothing changed) when a store would
        need tokens it has already freed or compressed. crop(0) trims what `record_past` kept."""
        end = self.crop_end(tokens_to_remove)
        reason = self.crop_refusal(end)
        if reason:
            raise KvtoolError(f"cannot drop {self.seen - end} token(s) from the cache: {reason}")
        self.crop_to(end)

    def crop_to(self, end: int) -> None:
        """Keep the first `end` tokens; the caller has checked `crop_refusal(end)`."""
        for s in self.stores:
            s.crop(end)
        self.seen, self.pending, self.uncropped = end, None, False


def _q_index(kv_heads: torch.Tensor, group: int) -> torch.Tensor:
    """Query heads of the given KV heads, in order: [len(kv_heads) · group]."""
    return (kv_heads.view(-1, 1) * group + torch.arange(group).view(1, -1)).view(-1)
