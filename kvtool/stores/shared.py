"""The shared-key store: within a group of consecutive layers, the keys of DISTANT tokens are stored once, by the
group's leader (its first layer), and every member layer reads them (PoD, Ma et al., "Compressing KV Cache for
Long-Context LLM Inference with Inter-Layer Attention Similarity", arXiv 2412.02252; related: MiniCache, Liu et al.,
arXiv 2405.14366, which merges adjacent layers' states instead).

- PROXIMAL tokens stay per layer in 16 bits: the first `sink` tokens (keys and values) and the last `podrecent` tokens'
  keys. A query at position p sees them under the streaming rule (kvtool.windows.window_allowed).
- DISTANT tokens (sink ≤ position ≤ p − podrecent) are read with the leader's keys (`SharedKeys`, one per group,
  counted once, by the leader's store) and the layer's OWN values: PoD shares keys only. Values of every token after
  the sink stay per layer, in 16 bits (this store does not quantize; the cache refuses `pod` with k or v < 16).
- The two partial softmaxes (proximal over own keys, distant over shared keys) merge by log-sum-exp
  (kvtool.stores.base.merge); when both key sets are exact the result is full attention.
- `pod=on` reads the leader's post-RoPE keys as they are (PoD's sharing, which PoD makes work by post-training; we do
  not train). `pod=map` is training-free: the bank keeps the leader's keys pre-RoPE (RoPE undone with the model's
  rotary table, as the quantized store does for krope=pre) and a member reads RoPE(leader_pre @ W) with W [D, D] per KV
  head, the least-squares map fitted by `kvtool calibrate --method pod` (`layers.pod.map`); the maps are held in the
  storage dtype and counted in the member's nbytes().

Order: the leader layer runs before its members in a forward pass and appends each chunk right after its attention
call, so a member reads, in the same chunk, keys the leader has already appended. A member reads only the positions its
queries need (up to max(qpos) − podrecent) and refuses (KvtoolError) if the leader has not appended them: it never
reads ahead of its leader.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.policy import _choice, _count, register_field, simple
from kvtool.stores.base import Store, batch_rows, empty_partial, merge, partial, register, tensor_bytes
from kvtool.windows import causal_allowed, window_allowed

POD_MODES = ("off", "on", "map")

register_field(
    simple("pod", lambda t: _choice("pod", t, POD_MODES), "off", "`off`, `on`, `map`",
           "Share distant tokens' keys within the layer groups of `kvtool calibrate --method pod` (PoD): `on` reads "
           "the leader layer's keys as they are, `map` through the fitted least-squares map per KV head. Retrieval "
           "heads only; needs k=16,v=16.", "shared"),
    simple("podrecent", lambda t: _count("podrecent", t, 1), 256, "tokens",
           "Most recent tokens whose own keys a `pod` layer keeps (proximal, with the `sink` tokens); older ones read "
           "the leader's keys.", "shared"),
)


class SharedKeys:
    """The keys a group shares: the leader layer's keys of positions sink.. for KV heads `heads` (indices into the
    layer's KV heads), k [B, len(heads), n, D] in `dtype`, post-RoPE, or pre-RoPE when `rope` (a RopeTable) is set.
    `seen`: the position after the last token the leader appended (sink tokens included)."""

    def __init__(self, leader: int, heads: torch.Tensor, sink: int, dtype: torch.dtype, rope=None):
        self.leader, self.heads, self.sink, self.dtype, self.rope = leader, heads, sink, dtype, rope
        self.reset()

    def reset(self) -> None:
        self.k = None
        self.seen = 0

    def append(self, k: torch.Tensor, pos: torch.Tensor) -> None:
        """k [B, h, t, D] post-RoPE at consecutive positions pos [t]; positions below `sink` are not kept."""
        keep = pos >= self.sink
        if bool(keep.any()):
            first = int(pos[keep][0])
            new = k[:, :, keep]
            if self.rope is not None:
                new = self.rope.unrotate(new, first)
            new = new.to(self.dtype)
            self.k = new if self.k is None else torch.cat([self.k, new], 2)
        self.seen = int(pos[-1]) + 1

    def read(self, start: int, end: int, idx: torch.Tensor | None = None, w: torch.Tensor | None = None):
        """float32 [B, h, end-start, D]: post-RoPE keys of positions start..end-1 (sink ≤ start), of bank heads `idx`
        (None: all), through maps w [h, D, D] (None: as they are)."""
        if end > self.seen:
            raise KvtoolError(f"a layer read keys of positions up to {end - 1} that its leader layer {self.leader} "
                              f"has not appended yet (it holds {self.seen}): the leader must run first")
        x = self.k[:, :, start - self.sink:end - self.sink]
        if idx is not None:
            x = x[:, idx]
        x = x.float()
        if w is not None:
            x = torch.matmul(x, w.to(x.device, torch.float32))                  # [B, h, n, D] @ [h, D, D]
        if self.rope is not None:
            x = self.rope.rotate_rows(x, start)
        return x

    def nbytes(self) -> int:
        return tensor_bytes(self.k)


@register("shared")
class SharedStore(Store):
    """One layer's heads in a PoD group. Leader (`leader=True`): sink_k/sink_v [B, h, s, D], values v [B, h, n, D] of
    positions sink.., its keys of those positions in the bank (it owns and appends to `bank`). Member: sink_k/sink_v,
    recent_k [B, h, ≤podrecent, D] (its own last keys), v of positions sink..; distant keys from `bank` heads `idx`
    through maps `w` [h, D, D] (None: shared as they are)."""

    reads = ("pod", "sink", "podrecent", "dtype")

    def __init__(self, bank: SharedKeys, leader: bool, sink: int, recent: int, dtype: torch.dtype,
                 idx: torch.Tensor | None = None, w: torch.Tensor | None = None):
        if bank.sink != sink:
            raise ValueError("a shared store and its bank must use the same sink")
        self.bank, self.leader, self.n_sink, self.n_recent, self.dtype = bank, leader, sink, recent, dtype
        self.idx = idx
        self.w = None if w is None else w.to(dtype)
        self.reset()

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.recent_k = self.v = None
        self.seen = 0
        if self.leader:
            self.bank.reset()

    def __len__(self) -> int:                                                # tokens whose values are held
        return 0 if self.sink_k is None else self.sink_k.shape[2] + self.v.shape[2]

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t] (consecutive from 0, continuing what was appended)."""
        if self.sink_k is None:
            if int(pos[0]) != 0:
                raise ValueError("a shared store starts at position 0")
            self.sink_k = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=self.dtype)
            self.sink_v = self.v = self.recent_k = self.sink_k
        t = k.shape[2]
        take = max(0, min(t, self.n_sink - self.sink_k.shape[2]))
        if take:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :take].to(self.dtype)], 2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :take].to(self.dtype)], 2)
        self.v = torch.cat([self.v, v[:, :, take:].to(self.dtype)], 2)
        if self.leader:
            self.bank.append(k, pos)
        else:
            keep = min(self.n_recent, t - take)
            old = min(self.recent_k.shape[2], self.n_recent - keep)
            self.recent_k = torch.cat([self.recent_k[:, :, self.recent_k.shape[2] - old:],
                                       k[:, :, t - keep:].to(self.dtype)], 2)
        self.seen = int(pos[-1]) + 1

    def _values(self, new) -> torch.Tensor:
        """Values of positions 0..seen-1 (then the new chunk's), [B, h, n, D]."""
        parts = [] if self.sink_v is None else [self.sink_v, self.v]
        if new is not None:
            parts.append(new[1])
        return torch.cat([p.float() for p in parts], 2)

    def attend(self, q, qpos, scaling, new=None):
        """q [B, h·G, t, D] at positions qpos → (out, lse) over every position before each query (causal): the leader
        in one partial; a member as proximal (own keys) ⊕ distant (shared keys) merged by log-sum-exp."""
        if self.sink_k is None and new is None:
            return empty_partial(q)
        n_sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        vals = self._values(new)                                            # positions 0..total-1
        total = vals.shape[2]
        if self.leader:
            keys = [] if self.sink_k is None else [self.sink_k.float()]
            if self.seen > n_sink:
                keys.append(self.bank.read(n_sink, self.seen))
            if new is not None:
                keys.append(new[0].float())
            kpos = torch.arange(total, device=q.device)
            allowed = causal_allowed(qpos, kpos)
            return partial(q, torch.cat(keys, 2), vals, scaling, None if bool(allowed.all()) else allowed)
        # proximal: sink | own recent keys | the new chunk, under the window rule
        n_rec = 0 if self.recent_k is None else self.recent_k.shape[2]
        dev = q.device
        keys = [] if self.sink_k is None else [self.sink_k.float(), self.recent_k.float()]
        kpos = [torch.arange(n_sink, device=dev), torch.arange(self.seen - n_rec, self.seen, device=dev)]
        if new is not None:
            keys.append(new[0].float())
            kpos.append(qpos)
        kpos = torch.cat(kpos)
        prox = partial(q, torch.cat(keys, 2), vals[:, :, kpos], scaling,
                       window_allowed(qpos, kpos, self.n_sink, self.n_recent))
        # distant: positions sink .. max(qpos) - podrecent, the leader's keys (mapped)
        end = min(int(qpos.max()) - self.n_recent + 1, total)
        if end <= self.n_sink:
            return prox
        dpos = torch.arange(self.n_sink, end, device=dev)
        allowed = causal_allowed(qpos, dpos) & ~window_allowed(qpos, dpos, self.n_sink, self.n_recent)
        dist = partial(q, self.bank.read(self.n_sink, end, self.idx, self.w), vals[:, :, self.n_sink:end], scaling,
                       allowed)
        return merge([prox, dist])

    def select_batch(self, idx):
        """Batch rows idx of the own tensors; the leader also reorders the shared bank (once, for its members)."""
        self.sink_k, self.sink_v = batch_rows(self.sink_k, idx), batch_rows(self.sink_v, idx)
        self.recent_k, self.v = batch_rows(self.recent_k, idx), batch_rows(self.v, idx)
        if self.leader:
            self.bank.k = batch_rows(self.bank.k, idx)

    def rollback_refusal(self):
        return ("policy pod shares keys across layers and cannot drop tokens again (assisted and prompt-lookup "
                "decoding need that): use pod=off")

    def read(self):
        """The held tokens read whole: (k [B, h, n, D], v, kpos [n]). A leader's are exactly what any later query
        sees; a member's keys are its own for the sink and the last `podrecent` tokens and the (mapped) shared ones
        before, which is what the query right after them sees."""
        n_sink = self.sink_k.shape[2]
        vals = self._values(None)
        dev = vals.device
        if self.leader:
            k = torch.cat([self.sink_k.float(), self.bank.read(n_sink, self.seen)], 2)
        else:
            n_rec = self.recent_k.shape[2]
            mid = [self.bank.read(n_sink, self.seen - n_rec, self.idx, self.w)] if self.seen - n_rec > n_sink else []
            k = torch.cat([self.sink_k.float(), *mid, self.recent_k.float()], 2)
        return k, vals, torch.arange(self.seen, device=dev)

    def nbytes(self) -> int:
        """Own sink keys/values and values of every later token; the leader adds the shared keys (counted once, here),
        a member its own recent keys and its maps."""
        own = tensor_bytes(self.sink_k, self.sink_v, self.v)
        if self.leader:
            return own + self.bank.nbytes()
        return own + tensor_bytes(self.recent_k) + (tensor_bytes(self.w) if self.sink_k is not None else 0)
