"""`CompressedCache`: a transformers `Cache` that keeps, per layer, the whole context for retrieval KV heads and only
sink + recent tokens for streaming KV heads (DuoAttention arXiv 2410.10819, StreamingLLM arXiv 2309.17453).

The two kinds of head live in separate tensors, and a streaming store is trimmed to sink + recent right after each
attention call, so dropped tokens are freed, not masked. Retrieval heads keep every token in `TokenStore`s
(kvtool.kvstore): 16-bit sink, a body quantized as the policy says (KVQuant-style per-channel keys with calibrated
ranges, KIVI-style per-token values, packed codes), and a 16-bit recent buffer. `nbytes()` sums the tensors actually
held. The registered `"kvtool"` attention function reads the stores through the key tensor that `update()` returns
(it carries its layer). Batch size 1 or an unpadded batch (a padded one is refused); no sliding-window layers yet.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from transformers import AttentionInterface, Cache
from transformers.masking_utils import AttentionMaskInterface
from transformers.cache_utils import CacheLayerMixin

from kvtool.errors import KvtoolError
from kvtool.kvstore import KeyFormat, TokenStore, ValueFormat
from kvtool.policy import Policy
from kvtool.quant_setup import quant_formats
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
    if key == "heads.retrieval.score" and key not in profile and "heads.retrieval_score" in profile:
        key = "heads.retrieval_score"                    # a traced profile not yet calibrated: the trace's copy score
    if key not in profile:
        raise KvtoolError(f"policy heads={policy.heads}: the profile has no {key} (run kvtool calibrate --method {policy.heads})")
    if policy.fraction is not None:
        return top_fraction(profile[key], policy.fraction).bool()
    return profile[key].bool()


class HeadSplitLayer(CacheLayerMixin):
    """One layer. Retrieval heads: a key and a value `TokenStore` (16-bit sink | quantized body | 16-bit buffer).
    Streaming heads: `sink`/`recent` stores [B, |S|, ·, D], trimmed to sink + recent after each attention call.

    `update()` also keeps the new tokens' exact states until the attention call that reads them, so a token's own
    chunk sees it unquantized (later steps see what is stored)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, retrieval: torch.Tensor, policy: Policy, keys: KeyFormat | None = None,
                 values: ValueFormat | None = None, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.ret = retrieval.nonzero().view(-1)                                # retrieval KV head ids
        self.stream = (~retrieval).nonzero().view(-1)                          # streaming KV head ids
        self.policy, self.key_format, self.value_format = policy, keys, values
        self.n_sink, self.n_recent = policy.sink, policy.recent
        self.seen = 0                                                          # tokens seen, not tokens held
        self.k_store = self.v_store = None
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        self.new = None                                                        # (k, v) of the last update, exact

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        store = storage_dtype(self.policy.dtype, key_states.dtype)
        p = self.policy
        self.k_store = TokenStore(p.k, p.sink, p.buffer, store, key=self.key_format, backend=self.backend)
        self.v_store = TokenStore(p.v, p.sink, p.buffer, store, value=self.value_format, backend=self.backend)
        empty = lambda n: key_states.new_zeros(b, n, 0, d, dtype=store)        # noqa: E731
        self.sink_k, self.sink_v = empty(len(self.stream)), empty(len(self.stream))
        self.recent_k, self.recent_v = empty(len(self.stream)), empty(len(self.stream))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, H_kv, t, D] of the new tokens. Returns them tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        if len(self.ret):
            self.k_store.append(key_states[:, self.ret])
            self.v_store.append(value_states[:, self.ret])
        store = self.sink_k.dtype                                               # (zero-size when no streaming heads)
        take = max(0, min(t, self.n_sink - self.seen))                          # tokens that are still sink tokens
        if take:
            self.sink_k = torch.cat([self.sink_k, key_states[:, self.stream, :take].to(store)], 2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, self.stream, :take].to(store)], 2)
        self.recent_k = torch.cat([self.recent_k, key_states[:, self.stream, take:].to(store)], 2)
        self.recent_v = torch.cat([self.recent_v, value_states[:, self.stream, take:].to(store)], 2)
        self.seen += t
        self.new = (key_states, value_states)
        key_states.kvtool_layer = self
        return key_states, value_states

    def trim(self) -> None:
        """Free what streaming heads no longer need (keep the last `recent` non-sink tokens); drop the exact copy of
        the new tokens."""
        self.new = None
        if self.recent_k is not None and self.recent_k.shape[2] > self.n_recent:
            self.recent_k = self.recent_k[:, :, -self.n_recent:].clone()
            self.recent_v = self.recent_v[:, :, -self.n_recent:].clone()

    def retrieval_kv(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the retrieval heads for every token seen, [B, |R|, seen, D]; the newest tokens exact."""
        return self._exact_tail(self.k_store.read(dtype), self.v_store.read(dtype), self.ret)

    def streaming_kv(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [B, |S|, n, D] the streaming heads hold and their positions [n]; the newest tokens exact."""
        k, v = self._exact_tail(torch.cat([self.sink_k, self.recent_k], 2).to(dtype),
                                torch.cat([self.sink_v, self.recent_v], 2).to(dtype), self.stream)
        n_sink, n_rec = self.sink_k.shape[2], self.recent_k.shape[2]
        pos = torch.cat([torch.arange(n_sink), torch.arange(self.seen - n_rec, self.seen)]).to(k.device)
        return k, v, pos

    def _exact_tail(self, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor):
        """Overwrite the last t stored tokens (this call's new ones) of k, v [B, h, n, D] with their exact states."""
        if self.new is not None:
            t = self.new[0].shape[2]
            k[:, :, -t:] = self.new[0][:, heads].to(k.dtype)
            v[:, :, -t:] = self.new[1][:, heads].to(v.dtype)
        return k, v

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds for the tokens seen (not the exact copy of the newest chunk, which lives only
        until its attention call)."""
        held = [t for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v) if t is not None]
        for store in (self.k_store, self.v_store):
            if store is not None:
                held += store.tensors()
        return held

    def constants_nbytes(self) -> int:
        return sum(s.constants_nbytes() for s in (self.k_store, self.v_store) if s is not None and len(self.ret))

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k_store = self.v_store = self.new = None
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        self.seen, self.is_initialized = 0, False


def storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the unquantized parts for a policy `dtype` field."""
    if name == "auto":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    if name == "model":
        return model_dtype
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


class CompressedCache(Cache):
    """A transformers Cache holding what `policy` allows of a `profile` (see the module docstring).

    profile: a Profile, a path to a .kv.st file (loaded and checked against `model`), or None.
    policy: a policy string (kvtool.policy) or Policy; None takes the profile's default policy (or the lossless one
    without a profile). Building the cache switches `model` to the "kvtool" attention, which falls back to plain
    sdpa for any other cache, so the model keeps working with ordinary caches too."""

    def __init__(self, model, profile=None, policy: str | Policy | None = None, backend: str = "auto"):
        if isinstance(profile, (str, os.PathLike)):
            from kvtool.profile import Profile

            profile = Profile.load(profile, model=model)                    # a path: load (and check) it
        elif profile is not None and not hasattr(profile, "check_model"):
            raise KvtoolError(f"profile must be a kvtool Profile, a path to a .kv.st file or None "
                              f"(got {type(profile).__name__})")
        if policy is not None and not isinstance(policy, (str, Policy)):
            raise KvtoolError(f"policy must be a policy string such as 'heads=all,k=4,v=4', a Policy or None "
                              f"(got {type(policy).__name__})")
        default_method = _profile_method(profile)
        if isinstance(policy, Policy):
            self.policy = policy
        elif policy is None and profile is not None:
            self.policy = Policy.from_profile(profile.policy)
        else:
            self.policy = Policy.parse(policy, default_method)
        cfg = model.config.get_text_config()
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise KvtoolError("models with sliding-window layers are not supported by CompressedCache yet")
        if profile is not None:
            profile.check_model(model)
        self.dims = Dims.of(model)
        import cupy_kernels

        self.backend = cupy_kernels.select_backend(backend, next(model.parameters()).device)   # "torch" | "cupy"
        self.retrieval = retrieval_heads(self.policy, profile, self.dims)     # [L, H_kv] bool
        formats = quant_formats(model, profile, self.policy, self.dims, self.retrieval)
        layers = [HeadSplitLayer(self.retrieval[i], self.policy, *formats[i], backend=self.backend)
                  for i in range(self.dims.layers)]
        super().__init__(layers=layers)
        if model.config._attn_implementation != KVTOOL_ATTENTION:
            use_kvtool_attention(model)

    def nbytes(self) -> int:
        """Bytes actually held: 16-bit stores, packed codes, scales, outliers, plus the per-layer quantization
        constants (key ranges, codebooks) that reading the cache needs."""
        held = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
        return held + sum(layer.constants_nbytes() for layer in self.layers if layer.is_initialized)

    def full_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """What a full cache of every head for the tokens seen would take in `dtype`."""
        d = self.dims
        item = torch.empty(0, dtype=dtype).element_size()
        return 2 * d.layers * d.kv_heads * self.get_seq_length() * d.head_dim * item


def _profile_method(profile) -> str | None:
    """The calibration method a profile's default policy names (for a bare `heads=<fraction>`)."""
    heads = (getattr(profile, "policy", None) or {}).get("heads") if profile is not None else None
    name = str(heads).split(":")[0] if heads else None
    return name if name and name not in ("all", "none", "random") else None


def kvtool_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention over a HeadSplitLayer. query: [B, H_q, t, D]; returns ([B, t, H_q, D], None).

    With any other cache (no layer tag on `key`) this is plain causal sdpa, so a model switched to "kvtool" still
    works with a DynamicCache or no cache."""
    layer = getattr(key, "kvtool_layer", None)
    b, hq, t, d = query.shape
    if layer is None:
        s = key.shape[2]
        causal = torch.arange(s, device=query.device).view(1, -1) <= torch.arange(s - t, s, device=query.device).view(-1, 1)
        return _sdpa(query, key, value, causal, scaling, hq // key.shape[1]), None
    group = hq // (len(layer.ret) + len(layer.stream))
    out = query.new_empty(b, t, hq, d)
    pos = torch.arange(layer.seen - t, layer.seen, device=query.device)     # absolute positions of the queries
    fused = t == 1 and layer.backend == "cupy" and fused_shapes_ok(layer, d)   # decode step on the CuPy kernels
    if len(layer.ret):
        idx = _q_index(layer.ret, group)                                        # [|R|·G] query heads
        if fused and fused_retrieval_ok(layer):
            out[:, 0, idx] = fused_retrieval(layer, query[:, idx, 0], scaling)
        else:
            keys, values = layer.retrieval_kv(query.dtype)                      # [B, |R|, seen, D]
            causal = None if t == 1 else torch.arange(keys.shape[2], device=query.device).view(1, -1) <= pos.view(-1, 1)
            out[:, :, idx] = _sdpa(query[:, idx], keys, values, causal, scaling, group)
    if len(layer.stream):
        idx = _q_index(layer.stream, group)
        if fused:
            out[:, 0, idx] = fused_window(layer, query[:, idx, 0], scaling)
        else:
            keys, values, kpos = layer.streaming_kv(query.dtype)                # [B, |S|, n, D], [n]
            allowed = window_allowed(pos, kpos, layer.n_sink, layer.n_recent)
            out[:, :, idx] = _sdpa(query[:, idx], keys, values, allowed, scaling, group)
    layer.trim()
    return out, None


def fused_shapes_ok(layer: HeadSplitLayer, head_dim: int) -> bool:
    """What the CuPy kernels accept (cupy_kernels/kernels.py): head_dim 32/64/128/256, 16-bit stores, value groups a
    power of two in 8..256. Anything else stays on the torch path."""
    group = layer.value_format.group if layer.value_format is not None else 32
    return (head_dim in (32, 64, 128, 256) and layer.sink_k.dtype in (torch.float16, torch.bfloat16)
            and 8 <= group <= 256 and group & (group - 1) == 0)


def fused_retrieval_ok(layer: HeadSplitLayer) -> bool:
    """The fused decode kernel reads sink | packed body | buffer directly; pre-RoPE keys, key outliers, a zero
    buffer (the new token would be read quantized) and mixed 16-bit/quantized K and V take the torch path."""
    k, v = layer.k_store, layer.v_store
    if k.bits >= 16 and v.bits >= 16:
        return True
    return (k.bits < 16 and v.bits < 16 and layer.policy.buffer > 0 and k.key.rope is None and not k.key.outliers)


def fused_retrieval(layer: HeadSplitLayer, q: torch.Tensor, scaling) -> torch.Tensor:
    """q [B, |R|·G, D] → [B, |R|·G, D] with cupy_kernels.decode_attention (or window_attention when 16-bit)."""
    import cupy_kernels

    k, v = layer.k_store, layer.v_store
    if k.bits >= 16:
        return cupy_kernels.window_attention(q, torch.cat([k.sink, k.buf], 2), torch.cat([v.sink, v.buf], 2),
                                             scaling, backend="cupy")
    kq, vf = k.key.quantizer, v.value
    return cupy_kernels.decode_attention(q, k.sink, v.sink, k.codes, kq.lo, kq.span, kq.levels, k.bits,
                                         v.codes, v.lo, v.span, vf.levels, v.bits, k.buf, v.buf, scaling,
                                         backend="cupy")


def fused_window(layer: HeadSplitLayer, q: torch.Tensor, scaling) -> torch.Tensor:
    """Streaming heads at a decode step: the sink and the last `recent` tokens (the window rule) → [B, |S|·G, D]."""
    import cupy_kernels

    keys = torch.cat([layer.sink_k, layer.recent_k[:, :, -layer.n_recent:]], 2)
    values = torch.cat([layer.sink_v, layer.recent_v[:, :, -layer.n_recent:]], 2)
    return cupy_kernels.window_attention(q, keys, values, scaling, backend="cupy")


def _q_index(kv_heads: torch.Tensor, group: int) -> torch.Tensor:
    """Query heads of the given KV heads, in order: [len(kv_heads) · group]."""
    return (kv_heads.view(-1, 1) * group + torch.arange(group, device=kv_heads.device).view(1, -1)).view(-1)


def _sdpa(q, k, v, allowed, scaling, group) -> torch.Tensor:
    """q: [B, h·G, t, D], k/v: [B, h, s, D], allowed: [t, s] bool → [B, t, h·G, D]."""
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                                         enable_gqa=group > 1)
    return o.transpose(1, 2)


def kvtool_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """The mask hook transformers calls for the "kvtool" attention: masks are built inside the attention from token
    positions, so this returns None; a padding mask with any masked token is refused (one line, no wrong output)."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise KvtoolError("padded batches are not supported by the kvtool attention; batch prompts of equal length "
                          "without padding, or use batch size 1")
    return None


AttentionInterface.register(KVTOOL_ATTENTION, kvtool_attention)
AttentionMaskInterface.register(KVTOOL_ATTENTION, kvtool_mask)


def use_kvtool_attention(model) -> None:
    """Switch `model` to the kvtool attention (needed with a CompressedCache)."""
    model.set_attn_implementation(KVTOOL_ATTENTION)


@torch.inference_mode()
@functools.lru_cache(maxsize=None)
def _cache_arg(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword that hands `cache` to `model(...)` / `model.generate(...)`: `cache=` where the installed
    transformers names it so (5.24 warns that `past_key_values=` is deprecated), else `past_key_values=`."""
    return {_cache_arg(type(model)): cache}


def prefill(model, input_ids: torch.Tensor, cache: CompressedCache, chunk: int = 512) -> torch.Tensor:
    """Run a prompt [B, T] through the model in chunks (with a CompressedCache the full 16-bit cache never exists at
    once; any other cache works too); returns the last position's logits [B, V]."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise KvtoolError(f"prefill needs input_ids of shape [batch, tokens] with at least one token "
                          f"(got shape {list(input_ids.shape)})")
    if chunk < 1:
        raise KvtoolError(f"prefill chunk must be at least 1 token (got {chunk})")
    logits = None
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start:start + chunk]
        out = model(input_ids=piece, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits
