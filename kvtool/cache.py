"""`CompressedCache`: a transformers `Cache` that keeps, per layer, the whole context for retrieval KV heads and only
sink + recent tokens for streaming KV heads (DuoAttention arXiv 2410.10819, StreamingLLM arXiv 2309.17453).

The two kinds of head live in separate tensors, and a streaming store is trimmed to sink + recent right after each
attention call, so dropped tokens are freed, not masked; `nbytes()` sums the tensors actually held. The registered
`"kvtool"` attention function reads the store through the key tensor that `update()` returns (it carries its layer).
Batch size 1 (or an unpadded batch); no sliding-window layers yet; keys and values stay in the model's dtype.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin

from kvtool.errors import KvtoolError
from kvtool.policy import Policy
from kvtool.trace import Dims

KVTOOL_ATTENTION = "kvtool"


def window_allowed(qpos: torch.Tensor, kpos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """The streaming pattern, bool [n_q, n_k]: a query sees a key at or before it that is one of the first `sink`
    tokens or one of its last `recent` tokens. Shared by the cache and DuoAttention's training mask."""
    q, k = qpos.view(-1, 1), kpos.view(1, -1)
    return (k <= q) & ((k < sink) | (q - k < recent))


def retrieval_heads(policy: Policy, profile, dims: Dims) -> torch.Tensor:
    """bool [L, H_kv]: True = the head keeps every token."""
    from calibrate.heads import top_fraction

    shape = (dims.layers, dims.kv_heads)
    if policy.heads == "all":
        return torch.ones(shape, dtype=torch.bool)
    if policy.heads == "none":
        return torch.zeros(shape, dtype=torch.bool)
    if policy.heads == "random":
        g = torch.Generator().manual_seed(policy.seed)
        return top_fraction(torch.rand(shape, generator=g), policy.fraction).bool()
    if profile is None:
        raise KvtoolError(f"policy heads={policy.heads} needs a profile")
    key = f"heads.{policy.heads}.score" if policy.fraction is not None else f"heads.{policy.heads}.mask"
    if key not in profile:
        raise KvtoolError(f"policy heads={policy.heads}: the profile has no {key} (run kvtool calibrate --method {policy.heads})")
    if policy.fraction is not None:
        return top_fraction(profile[key], policy.fraction).bool()
    return profile[key].bool()


class HeadSplitLayer(CacheLayerMixin):
    """One layer: `full` store [B, |R|, T, D] for retrieval heads, `sink`/`recent` stores for streaming heads."""

    is_sliding = False
    is_croppable = False

    def __init__(self, retrieval: torch.Tensor, sink: int, recent: int):
        super().__init__()
        self.ret = retrieval.nonzero().view(-1)                                # retrieval KV head ids
        self.stream = (~retrieval).nonzero().view(-1)                          # streaming KV head ids
        self.n_sink, self.n_recent = sink, recent
        self.seen = 0                                                          # tokens seen, not tokens held
        self.full_k = self.full_v = self.sink_k = self.sink_v = self.recent_k = self.recent_v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        empty = lambda n: key_states.new_zeros(b, n, 0, d)                     # noqa: E731
        self.full_k, self.full_v = empty(len(self.ret)), empty(len(self.ret))
        self.sink_k, self.sink_v = empty(len(self.stream)), empty(len(self.stream))
        self.recent_k, self.recent_v = empty(len(self.stream)), empty(len(self.stream))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, H_kv, t, D] of the new tokens. Returns them tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        self.full_k = torch.cat([self.full_k, key_states[:, self.ret]], 2)
        self.full_v = torch.cat([self.full_v, value_states[:, self.ret]], 2)
        take = max(0, min(t, self.n_sink - self.seen))                          # tokens that are still sink tokens
        if take:
            self.sink_k = torch.cat([self.sink_k, key_states[:, self.stream, :take]], 2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, self.stream, :take]], 2)
        self.recent_k = torch.cat([self.recent_k, key_states[:, self.stream, take:]], 2)
        self.recent_v = torch.cat([self.recent_v, value_states[:, self.stream, take:]], 2)
        self.seen += t
        key_states.kvtool_layer = self
        return key_states, value_states

    def trim(self) -> None:
        """Free what streaming heads no longer need: keep only the last `recent` non-sink tokens."""
        if self.recent_k is not None and self.recent_k.shape[2] > self.n_recent:
            self.recent_k = self.recent_k[:, :, -self.n_recent:].clone()
            self.recent_v = self.recent_v[:, :, -self.n_recent:].clone()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.full_k, self.full_v, self.sink_k, self.sink_v, self.recent_k, self.recent_v)
                if t is not None]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.full_k = self.full_v = self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        self.seen, self.is_initialized = 0, False


class CompressedCache(Cache):
    """A transformers Cache holding what `policy` allows of a `profile` (see the module docstring)."""

    def __init__(self, model, profile=None, policy: str | Policy | None = None):
        self.policy = policy if isinstance(policy, Policy) else Policy.parse(policy)
        cfg = model.config.get_text_config()
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise KvtoolError("models with sliding-window layers are not supported by CompressedCache yet")
        if profile is not None:
            profile.check_model(model)
        self.dims = Dims.of(model)
        self.retrieval = retrieval_heads(self.policy, profile, self.dims)     # [L, H_kv] bool
        layers = [HeadSplitLayer(self.retrieval[i], self.policy.sink, self.policy.recent)
                  for i in range(self.dims.layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of the key/value tensors actually held."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def full_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """What a full cache of every head for the tokens seen would take in `dtype`."""
        d = self.dims
        item = torch.empty(0, dtype=dtype).element_size()
        return 2 * d.layers * d.kv_heads * self.get_seq_length() * d.head_dim * item


def kvtool_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention over a HeadSplitLayer. query: [B, H_q, t, D]; returns ([B, t, H_q, D], None)."""
    layer = getattr(key, "kvtool_layer", None)
    if layer is None:
        raise KvtoolError("the kvtool attention needs a CompressedCache (pass past_key_values=CompressedCache(...))")
    b, hq, t, d = query.shape
    group = hq // (len(layer.ret) + len(layer.stream))
    out = query.new_empty(b, t, hq, d)
    pos = torch.arange(layer.seen - t, layer.seen, device=query.device)     # absolute positions of the queries
    if len(layer.ret):
        idx = _q_index(layer.ret, group)                                        # [|R|·G] query heads
        keys = torch.arange(layer.full_k.shape[2], device=query.device)
        causal = keys.view(1, -1) <= pos.view(-1, 1)
        out[:, :, idx] = _sdpa(query[:, idx], layer.full_k, layer.full_v, causal, scaling, group)
    if len(layer.stream):
        idx = _q_index(layer.stream, group)
        ks = torch.cat([layer.sink_k, layer.recent_k], 2)                     # [B, |S|, n_sink + n_recent', D]
        vs = torch.cat([layer.sink_v, layer.recent_v], 2)
        n_sink, n_rec = layer.sink_k.shape[2], layer.recent_k.shape[2]
        kpos = torch.cat([torch.arange(n_sink), torch.arange(layer.seen - n_rec, layer.seen)]).to(query.device)
        allowed = window_allowed(pos, kpos, layer.n_sink, layer.n_recent)
        out[:, :, idx] = _sdpa(query[:, idx], ks, vs, allowed, scaling, group)
    layer.trim()
    return out, None


def _q_index(kv_heads: torch.Tensor, group: int) -> torch.Tensor:
    """Query heads of the given KV heads, in order: [len(kv_heads) · group]."""
    return (kv_heads.view(-1, 1) * group + torch.arange(group, device=kv_heads.device).view(1, -1)).view(-1)


def _sdpa(q, k, v, allowed, scaling, group) -> torch.Tensor:
    """q: [B, h·G, t, D], k/v: [B, h, s, D], allowed: [t, s] bool → [B, t, h·G, D]."""
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                                         enable_gqa=group > 1)
    return o.transpose(1, 2)


AttentionInterface.register(KVTOOL_ATTENTION, kvtool_attention)


def use_kvtool_attention(model) -> None:
    """Switch `model` to the kvtool attention (needed with a CompressedCache)."""
    model.set_attn_implementation(KVTOOL_ATTENTION)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: CompressedCache, chunk: int = 512) -> torch.Tensor:
    """Run a long prompt through the model in chunks, so the full 16-bit cache never exists; returns the last
    position's logits [B, V]."""
    logits = None
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start:start + chunk]
        out = model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits
