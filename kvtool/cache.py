"""`CompressedCache`: a transformers `Cache` whose layers are compositions of stores (kvtool/stores/), chosen by the
policy (kvtool.policy).

Per layer, the policy's `heads` field splits the KV heads into retrieval heads, which keep every token in a
`QuantizedStore` (16-bit sink | quantized body | 16-bit buffer; DuoAttention arXiv 2410.10819, KIVI arXiv
2402.02750, KVQuant arXiv 2401.18079), and streaming heads, which keep sink + recent tokens in a `WindowStore`
(StreamingLLM arXiv 2309.17453), or a `QuantizedWindowStore` when the policy quantizes the window (`wk`/`wv`). A
model's own sliding-window layers (`layer_types` "sliding_attention") get one
`SlidingStore` over all their heads. With policy `pod=on|map` (PoD arXiv 2412.02252), retrieval heads of a layer group
from `layers.pod.*` get `SharedStore`s: the group's leader keeps distant tokens' keys once in a `SharedKeys` bank
(built by `_shared_banks`) that its later layers read. A layer is a `StoreLayer` (kvtool/store_layer.py). Dropped tokens are freed, not masked; `nbytes()` sums what the stores hold.
The "kvtool" attention (kvtool/attention.py) reads the stores through the key tensor that `update()` returns (it
carries its layer) and merges their partial results by log-sum-exp. Batch size 1 or an unpadded batch (a padded one
is refused). For generate's strategies the layers implement transformers' batch and rollback calls: beam search's
`reorder_cache` and the batch selections (each store reindexes its rows), and assisted / prompt-lookup decoding's
`crop` of rejected draft tokens, exact for what the stores still hold and refused in one line otherwise
(docs/runtime.md, "Generate strategies").
"""

from __future__ import annotations

import os

import torch
from transformers import Cache

from kvtool import sections
from kvtool.attention import KVTOOL_ATTENTION, kvtool_attention, kvtool_mask, use_kvtool_attention  # noqa: F401
from kvtool.errors import KvtoolError
from kvtool.modelinfo import Dims, has_rope
from kvtool.models import with_cache  # noqa: F401  (re-exported: kvtool.cache.with_cache)
from kvtool.policy import Policy
from kvtool.lowrank_setup import lowrank_formats
from kvtool.quant_setup import quant_formats
from kvtool.select import top_fraction
from kvtool.store_layer import HeadGroup, StoreLayer, _q_index  # noqa: F401  (re-exported)
from kvtool.stores import (H2OStore, QuantizedStore, QuantizedWindowStore, SharedKeys, SharedStore, SlidingStore,  # noqa: F401
                           SnapKVStore, Store, WindowStore, storage_dtype)
from kvtool.stores.lowrank import LowRankStore
from kvtool.windows import layer_types, window_allowed  # noqa: F401  (window_allowed: re-exported)


def retrieval_heads(policy: Policy, profile, dims: Dims) -> torch.Tensor:
    """bool [L, H_kv]: True = the head keeps every token."""
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
    want = sections.heads_score(policy.heads) if policy.fraction is not None else sections.heads_mask(policy.heads)
    key = sections.resolve(profile, want)
    if key is None:
        raise KvtoolError(f"policy heads={policy.heads}: the profile has no {want} "
                          f"(run kvtool calibrate --method {policy.heads})")
    if policy.fraction is not None:
        return top_fraction(profile[key], policy.fraction).bool()
    return profile[key].bool()


def share_prefill_refusal(policy: Policy) -> str | None:
    """Why a cache of `policy` cannot share its prompt's prefill with other caches (None: it can, on a model without
    sliding-window layers; `CompressedCache.share_refusal` checks the built cache). A pure function of the policy, so
    `kvtool bench --share-prefill` can group specs before running them.

    Up to the end of the prompt a `select=snapkv++|snapkv` cache with `heads=all` holds every token of every head in
    16 bits, in one SnapKV store per layer, and records the last `obs` queries: its state is the same whatever its
    budget, obs window (a longer recorded window holds every shorter one), kernel, pool, stage 2 (`read`, `page`,
    `rdims`: page summaries are rebuilt) or quantized body (`k`, `v`, `sink`, `buffer`: made at the selection), and
    only the storage `dtype` must match. Everything else changes the prefill itself: streaming heads (`heads` other
    than `all`) and H2O evict as tokens arrive; without `select` the stores quantize, window or project the prompt as
    it comes."""
    if policy.select not in ("snapkv++", "snapkv"):
        what = "no token selection" if policy.select == "off" else f"select={policy.select} evicts as tokens arrive"
        return f"{what}: only select=snapkv++ / snapkv hold every prompt token until the prompt ends"
    if policy.heads != "all":
        return (f"heads={policy.heads}: streaming heads keep a window that drops tokens during the prefill; only "
                "heads=all holds every prompt token until the selection")
    if policy.budget is None:
        return f"select={policy.select} needs a budget"
    return None


def sliding_window(model) -> tuple[list[bool], int | None]:
    """Which layers are the model's own sliding-window layers, and their window (config.sliding_window): those of
    `layer_types` "sliding_attention" (Gemma 2/3, Qwen 2/3), or every layer of a model without `layer_types` whose
    config sets a sliding window (Mistral, Phi-3: their masks slide on every layer)."""
    cfg = model.config.get_text_config()
    types = layer_types(cfg)
    sliding = [t == "sliding_attention" for t in types]
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise KvtoolError(f"layer types {', '.join(other)} are not supported by CompressedCache")
    window = getattr(cfg, "sliding_window", None)
    if any(sliding) and not window:
        raise KvtoolError("the model has sliding-window layers but no config.sliding_window")
    return sliding, window


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
        if isinstance(policy, Policy):
            self.policy = policy
        elif policy is None and profile is not None:
            self.policy = Policy.from_profile(profile.policy)
        else:
            self.policy = Policy.parse(policy, _profile_method(profile))
        if profile is not None:
            profile.check_model(model)
        self.dims = Dims.of(model)
        self.sliding, self.window = sliding_window(model)
        import cupy_kernels

        from kvtool.models import input_device

        device = input_device(model)
        self.backend = cupy_kernels.select_backend(backend, device)       # "torch" | "cupy"
        self.retrieval = retrieval_heads(self.policy, profile, self.dims)  # [L, H_kv] bool
        self.snap_defaults = self._selection(profile)                      # token selection: refusals, defaults
        dtype = storage_dtype(self.policy.dtype, next(model.parameters()).dtype)
        self.lowrank = lowrank_formats(model, profile, self.policy, self.dims, self.retrieval)  # [L] latents | None
        self.pod_leader, self.pod_maps, self.banks = self._shared_banks(model, profile, dtype)
        formats = quant_formats(model, profile, self.policy, self.dims, self.retrieval)
        self.wformats = None                                               # streaming heads' window formats
        if self.policy.wk < 16 or self.policy.wv < 16:
            self.wformats = quant_formats(model, profile, self.policy.replace(k=self.policy.wk, v=self.policy.wv),
                                          self.dims, ~self.retrieval)
        layers = [self._layer(i, formats[i], dtype) for i in range(self.dims.layers)]
        super().__init__(layers=layers)
        used = [f[0].rope for f in formats + (self.wformats or []) if f[0] is not None]
        used += [x[2] for x in self.lowrank or [] if x is not None] + [b.rope for b in self.banks.values()]
        self._rope_tables = list({id(t): t for t in used if t is not None}.values())   # shared with the model
        if model.config._attn_implementation != KVTOOL_ATTENTION:
            use_kvtool_attention(model)
        text = model.config.get_text_config()
        for layer in self.layers:
            layer.model_config = text                                     # update() checks the attention is ours

    def _shared_banks(self, model, profile, dtype):
        """The PoD groups of policy `pod` (kvtool/stores/shared.py): (leader [L, H_kv] long, maps [L, H_kv, D, D] or
        None, banks {leader layer: SharedKeys}); (None, None, {}) with pod=off. A bank holds the leader's keys of the
        KV heads that are retrieval heads in the leader and in at least one later layer of its group."""
        if self.policy.pod == "off":
            return None, None, {}
        from kvtool.sharing import SECTION

        d = self.dims
        if profile is None or f"{SECTION}.leader" not in profile or f"{SECTION}.map" not in profile:
            raise KvtoolError(f"policy pod={self.policy.pod} needs a profile with {SECTION}.* "
                              "(run kvtool calibrate --method pod)")
        if self.policy.quantized:
            raise KvtoolError(f"policy pod={self.policy.pod} does not compose with k or v below 16 bits yet "
                              "(shared keys and per-layer values are 16-bit): use k=16,v=16")
        if self.lowrank and any(self.lowrank):
            raise KvtoolError(f"policy pod={self.policy.pod} does not compose with krank / vrank yet: use one of them")
        leader, maps = profile[f"{SECTION}.leader"].long(), profile[f"{SECTION}.map"]
        if tuple(leader.shape) != (d.layers, d.kv_heads) or tuple(maps.shape) != (d.layers, d.kv_heads, d.head_dim,
                                                                                  d.head_dim):
            raise KvtoolError(f"{SECTION}.leader/map have shapes {list(leader.shape)}/{list(maps.shape)}, not "
                              f"[{d.layers}, {d.kv_heads}] / [..., {d.head_dim}, {d.head_dim}] of this model")
        for l, h in (leader != torch.arange(d.layers).view(-1, 1)).nonzero().tolist():
            j = int(leader[l, h])
            if not 0 <= j < l:
                raise KvtoolError(f"{SECTION}.leader: layer {l} names layer {j} as its leader (not an earlier layer)")
            inside = [s for s in range(j, l + 1) if self.sliding and self.sliding[s]]
            if inside:
                raise KvtoolError(f"{SECTION}: the group of layers {j}-{l} spans sliding-window layer {inside[0]}, "
                                  "which keeps its own window and cannot share keys")
        rope = None
        if self.policy.pod == "map":
            from kvtool.kvstore import RopeTable

            rope = RopeTable.of(model, d.head_dim)
            if rope is None:
                raise KvtoolError(f"policy pod=map maps pre-RoPE keys and needs a full-width rotary embedding; "
                                  f"{type(model).__name__} has {'a partial one' if has_rope(model) else 'no RoPE'}: "
                                  "use pod=on")
        banks = {}
        for j in range(d.layers):
            later = (leader[j + 1:] == j) & self.retrieval[j + 1:]                     # [L-j-1, H]
            heads = (self.retrieval[j] & later.any(0)).nonzero().view(-1)
            if len(heads):
                banks[j] = SharedKeys(j, heads, self.policy.sink, dtype, rope)
        return leader, (maps if self.policy.pod == "map" else None), banks

    def _selection(self, profile) -> list[dict]:
        """Per layer, the calibrated SnapKV defaults {obs, kernel} of the profile's `snapkv.` section (kvtool
        calibrate --method snapkv; empty without one); refuses what token selection does not compose with yet."""
        pol, n = self.policy, self.dims.layers
        if pol.select == "off":
            if pol.budget is not None or pol.read is not None:
                raise KvtoolError("policy budget / read need a token selection: add select=snapkv++ (or snapkv, h2o)")
            return [{} for _ in range(n)]
        if pol.krank is not None or pol.vrank is not None or pol.pod != "off":
            raise KvtoolError(f"policy select={pol.select} does not compose with krank / vrank or pod yet")
        if pol.quantized and (pol.select != "snapkv++" or pol.read is not None or pol.krope == "pre"):
            raise KvtoolError(f"policy select={pol.select}: only select=snapkv++ without read and with krope=post "
                              "quantizes its kept tokens (k / v below 16); the others keep them in 16 bits")
        if profile is None or "snapkv.obs" not in profile:
            return [{} for _ in range(n)]
        obs, kernel = profile["snapkv.obs"].long().tolist(), profile["snapkv.kernel"].long().tolist()
        if len(obs) != n or len(kernel) != n:
            raise KvtoolError(f"the profile's snapkv section covers {len(obs)} layers, not this model's {n}")
        return [{"obs": o, "kernel": k} for o, k in zip(obs, kernel)]

    def _layer(self, i: int, fmt, dtype) -> StoreLayer:
        """Layer i's stores: one SlidingStore for a sliding-window layer, else QuantizedStore (retrieval heads; a
        LowRankStore when the policy sets krank / vrank) and WindowStore (streaming heads); with policy `pod`,
        retrieval heads that lead or join a group's shared keys get a SharedStore per leader layer instead."""
        if self.sliding and self.sliding[i]:
            return StoreLayer([HeadGroup(SlidingStore(self.window, dtype), None, None)], sliding=True,
                              backend=self.backend)
        g, n = self.dims.group, self.dims.kv_heads
        ret = self.retrieval[i].clone()
        parts: list[tuple[Store, torch.Tensor]] = []                          # (store, its KV heads)
        pol = self.policy
        if i in self.banks:                                                   # leader of its heads' group
            bank = self.banks[i]
            parts.append((SharedStore(bank, True, pol.sink, pol.podrecent, dtype), bank.heads))
            ret[bank.heads] = False
        if self.pod_leader is not None:
            for j in sorted(set(self.pod_leader[i].tolist()) - {i}):
                if j not in self.banks:
                    continue
                bank = self.banks[j]
                heads = (ret & (self.pod_leader[i] == j) & torch.isin(torch.arange(n), bank.heads)).nonzero().view(-1)
                if not len(heads):
                    continue
                idx = (bank.heads.view(1, -1) == heads.view(-1, 1)).int().argmax(1)   # heads' rows in the bank
                w = None if self.pod_maps is None else self.pod_maps[i, heads]         # [h, D, D]
                parts.append((SharedStore(bank, False, pol.sink, pol.podrecent, dtype, idx, w), heads))
                ret[heads] = False
        if ret.any():
            # with pod, fmt is (None, None): the cache refuses pod with k or v < 16, so formats never need slicing
            latents = self.lowrank[i] if self.lowrank else None                  # pod and krank/vrank: refused
            if pol.select in ("snapkv++", "snapkv"):
                body = (lambda: QuantizedStore.from_policy(pol, dtype, key=fmt[0], value=fmt[1], backend=self.backend)) \
                    if pol.quantized else None                                # the kept tokens, quantized
                store = SnapKVStore.from_policy(pol, dtype, body=body, **self.snap_defaults[i])
            elif pol.select == "h2o":
                store = H2OStore.from_policy(pol, dtype)
            else:
                store = LowRankStore.from_policy(pol, dtype, key=latents[0], value=latents[1], rope=latents[2]) \
                    if latents else QuantizedStore.from_policy(pol, dtype, key=fmt[0], value=fmt[1],
                                                               backend=self.backend)
            parts.append((store, ret.nonzero().view(-1)))
        stream = (~self.retrieval[i]).nonzero().view(-1)
        if len(stream):
            if self.wformats is None:
                parts.append((WindowStore.from_policy(pol, dtype), stream))
            else:
                wf = self.wformats[i]
                parts.append((QuantizedWindowStore.from_policy(pol, dtype, key=wf[0], value=wf[1],
                                                               backend=self.backend), stream))
        every = len(parts) == 1
        return StoreLayer([HeadGroup(s, None if every else h, None if every else _q_index(h, g)) for s, h in parts],
                          backend=self.backend)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens of every layer (assisted / prompt-lookup decoding's rejected drafts): all layers or
        none (KvtoolError naming why, e.g. a window store already freed a token the shorter context needs)."""
        ends = [layer.crop_end(tokens_to_remove) for layer in self.layers]
        for i, (layer, end) in enumerate(zip(self.layers, ends)):
            reason = layer.crop_refusal(end)
            if reason:
                raise KvtoolError(f"cannot drop {layer.seen - end} token(s) from the cache (layer {i}): {reason}")
        for layer, end in zip(self.layers, ends):
            layer.crop_to(end)                                # checked above, all layers before any changes

    def activate_past_recording(self, **kwargs) -> None:
        """generate calls this before assisted / prompt-lookup decoding (transformers 5.17, 5.24 and 5.25 do, 5.25
        with keyword options for recurrent layers, which a KV cache has none of; with 5.0
        call it yourself before such a generate, or a window store refuses the first crop past its window): window and
        sliding stores then keep the tokens they would free until the next crop. Refused when a store can never
        drop tokens (policy pod)."""
        for layer in self.layers:
            for s in layer.stores:
                reason = s.rollback_refusal()
                if reason:
                    raise KvtoolError(f"assisted and prompt-lookup decoding are not supported by this cache: {reason}")
        for layer in self.layers:
            layer.activate_past_recording(**kwargs)

    def prompt_started(self) -> None:
        """kvtool's prefill starts: selecting stores wait for finish_prefill (a one-token last chunk is prompt)."""
        for layer in self.layers:
            for s in layer.stores:
                if hasattr(s, "lazy"):
                    s.lazy = False

    # ---- a shared prefill (kvtool bench --share-prefill) -----------------------------------------------------------
    def share_refusal(self) -> str | None:
        """Why this cache cannot share a prefill (see `share_prefill_refusal`): its policy, or a layer that is not one
        SnapKV store over every head (a model's own sliding-window layer keeps a window of its own)."""
        reason = share_prefill_refusal(self.policy)
        if reason:
            return reason
        for i, layer in enumerate(self.layers):
            if layer.is_sliding or len(layer.groups) != 1 or not isinstance(layer.groups[0].store, SnapKVStore):
                kinds = ", ".join(type(s).__name__ for s in layer.stores)
                return f"layer {i} holds {kinds}, not one SnapKV store over every head"
        return None

    def share_key(self) -> tuple:
        """Caches with equal keys (and no share_refusal) compute the same prefill: the storage dtype of each layer."""
        return tuple(str(layer.groups[0].store.dtype) for layer in self.layers)

    def widen_obs(self, others) -> None:
        """Before a shared prefill: record, per layer, the longest observation window of this cache and `others`,
        so every cache of the group can adopt the prefill (each keeps the last `obs` queries of its own)."""
        if self.get_seq_length():
            raise KvtoolError("widen_obs: the cache has seen tokens already; call it before the prefill")
        for i, layer in enumerate(self.layers):
            for s in layer.stores:
                s.obs = max([s.obs] + [o.layers[i].stores[0].obs for o in others])

    def adopt_prefill(self, other: "CompressedCache") -> None:
        """Take over the prompt state of `other`, prefilled with `prefill(..., finish=False)` and not yet selected, so
        that this fresh cache (another policy of the same group) then selects with `finish_prefill()` exactly as if it
        had run the prefill itself: every token's keys, values and positions, the recorded observation queries, the
        layers' token counts. Refused in one line (nothing changed) when it would not be exact: a cache that is not
        shareable (`share_refusal`), a different model structure or storage dtype, a fresh cache that has seen
        tokens, a source that selected already, or an obs window longer than the source recorded (`widen_obs`)."""
        if not isinstance(other, CompressedCache):
            raise KvtoolError(f"adopt_prefill needs a CompressedCache (got {type(other).__name__})")
        for who, cache in (("this cache", self), ("the source", other)):
            reason = cache.share_refusal()
            if reason:
                raise KvtoolError(f"cannot share a prefill with {who} ({cache.policy}): {reason}")
        if self.dims != other.dims:
            raise KvtoolError(f"cannot adopt a prefill of another model structure ({other.dims} vs {self.dims})")
        if self.share_key() != other.share_key():
            raise KvtoolError(f"cannot adopt a prefill stored as {other.share_key()[0]}: this cache stores "
                              f"{self.share_key()[0]}")
        if len({layer.seen for layer in other.layers}) != 1:
            raise KvtoolError("cannot adopt a prefill whose layers saw different numbers of tokens")
        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            if mine.seen:
                raise KvtoolError("cannot adopt a prefill into a cache that has seen tokens (reset it first)")
            if theirs.pending is not None:
                raise KvtoolError("cannot adopt a prefill in the middle of a forward")
            reason = mine.groups[0].store.adopt_refusal(theirs.groups[0].store)
            if reason:
                raise KvtoolError(f"cannot adopt this prefill (layer {i}): {reason}")
        for mine, theirs in zip(self.layers, other.layers):
            mine.groups[0].store.adopt(theirs.groups[0].store)
            mine.seen, mine.uncropped, mine.pending = theirs.seen, theirs.uncropped, None
            if theirs.is_initialized:
                mine.dtype, mine.device, mine.is_initialized = theirs.dtype, theirs.device, True

    def finish_prefill(self) -> None:
        """The prompt ended: stores that select tokens from it (SnapKV) select now. kvtool's `prefill` calls this
        after its last chunk; tokens that come later (decode steps, a question after compression) are kept."""
        for layer in self.layers:
            for s in layer.stores:
                finish = getattr(s, "finish_prefill", None)
                if finish is not None:
                    finish()

    def read_nbytes(self) -> int:
        """Bytes the last forward read from the stores (per decode step after a decode step): the pages RocketKV's
        stage 2 chose (policy `read`), everything held by every other store."""
        return sum(getattr(s, "read_nbytes", s.nbytes)() for layer in self.layers for s in layer.stores)

    def nbytes(self) -> int:
        """Bytes actually held: 16-bit stores, packed codes, scales, outliers, plus the per-layer quantization
        constants (key ranges, codebooks) that reading the cache needs."""
        return sum(layer.nbytes() for layer in self.layers)

    def shared_nbytes(self) -> int:
        """Bytes this cache reads that are held once per model, not per sequence, and so not in nbytes(): the RoPE
        cos/sin tables of pre-RoPE stores (kvtool.kvstore.RopeTable; float32, up to the longest position seen by any
        cache of the model, rounded up to 512). A server holding many sequences pays them once; a single sequence
        pays them whole (about 0.75 KiB per position for head_dim 64)."""
        return sum(t.nbytes() for t in self._rope_tables)

    def full_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """What transformers' DynamicCache of this model would hold for the tokens seen, in `dtype`: every token for
        full-attention layers, at most `sliding_window - 1` tokens for the model's own sliding-window layers, for
        each sequence of the batch held (beams, num_return_sequences)."""
        d = self.dims
        item = torch.empty(0, dtype=dtype).element_size()
        seen = self.get_seq_length()
        tokens = sum(min(seen, self.window - 1) if self.sliding and self.sliding[i] else seen
                     for i in range(d.layers))
        batch = next((b for b in (layer.held_batch for layer in self.layers) if b), 1)
        return 2 * d.kv_heads * tokens * d.head_dim * item * batch


def _profile_method(profile) -> str | None:
    """The calibration method a profile's default policy names (for a bare `heads=<fraction>`)."""
    if profile is None:
        return None
    try:
        heads = Policy.from_profile(getattr(profile, "policy", None)).heads
    except KvtoolError:
        return None
    return heads if heads not in ("all", "none", "random") else None




@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: Cache, chunk: int = 512, finish: bool = True) -> torch.Tensor:
    """Run a prompt [B, T] through the model in chunks (with a CompressedCache the full 16-bit cache never exists at
    once; any other cache works too); returns the last position's logits [B, V]. Then `cache.finish_prefill()`
    where the cache has one (token selection at the end of the prompt, kvtool/stores/snapkv.py); `finish=False`
    leaves the prompt open (a shared prefill that other caches adopt: `CompressedCache.adopt_prefill`)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise KvtoolError(f"prefill needs input_ids of shape [batch, tokens] with at least one token "
                          f"(got shape {list(input_ids.shape)})")
    if chunk < 1:
        raise KvtoolError(f"prefill chunk must be at least 1 token (got {chunk})")
    logits = None
    if isinstance(cache, CompressedCache):
        cache.prompt_started()
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start:start + chunk]
        out = model(input_ids=piece, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    done = getattr(cache, "finish_prefill", None)
    if finish and done is not None:                                      # the prompt ended: SnapKV selects
        done()
    return logits
