"""Every attention function and mask hook kvtool registers with transformers (AttentionInterface /
AttentionMaskInterface), here and nowhere else:

* "kvtool": the runtime's attention over a `CompressedCache` (below);
* "kvtool_trace": the trace's exact attention with statistics on the side (`trace_attention` calls the forward that
  kvtool.trace.observing pushes on `TRACE_OBSERVERS`, kvtool.trace.trace_forward);
* "kvtool_duo": DuoAttention's gated full/streaming mix used to train the gates (`duo_attention`, `DuoState`; used
  by calibrate/duo.py).

A low module: it imports nothing from the runtime's stores or cache, nor from kvtool.trace or calibrate/ (the score
algebra it shares with the stores is kvtool.scores); the "kvtool" function reads a layer through the object the cache
tags its keys with.

The "kvtool" attention:

At each attention call a layer of the cache holds the new chunk's exact keys/values (`StoreLayer.pending`). For every
group of KV heads, its store gives a partial result over what it holds plus the new chunk read exactly (so a chunk's
own tokens are never read back quantized), then the chunk is appended to the store; groups write disjoint query
heads. A decode step on the "cupy" backend appends first and calls the store's fused kernel instead.
With any other cache (no layer tag on `key`) the function is plain causal sdpa, so a model switched to "kvtool" keeps
working with a DynamicCache or no cache.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvtool.errors import KvtoolError
from kvtool.scores import Scaling, partial
from kvtool.windows import causal_allowed, sliding_allowed, window_allowed

KVTOOL_ATTENTION = "kvtool"
TRACE_ATTENTION = "kvtool_trace"
DUO_ATTENTION = "kvtool_duo"


def kvtool_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                     sliding_window=None, s_aux=None, **kwargs):
    """query [B, H_q, t, D] → ([B, t, H_q, D], None). Honours what the model passes: its `scaling`, logit soft-capping
    (`softcap`, Gemma 2), a sliding window (`sliding_window`; the stores keep it by themselves) and attention sinks
    (`s_aux` [H_q]: one learned logit per query head that takes its share of the softmax and adds no value)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scale = Scaling(scaling, softcap)
    layer = getattr(key, "kvtool_layer", None)
    if layer is None:
        return plain_attention(query, key, value, scale, sliding_window, s_aux), None
    return attend_layer(layer, query, scale, s_aux), None


def plain_attention(query, key, value, scaling, sliding_window=None, sinks=None) -> torch.Tensor:
    """Attention with any other cache (or none): the t queries are the last t of the S keys; causal, within
    `sliding_window` when set → [B, t, H_q, D]. Plain sdpa when there is nothing else to honour."""
    b, hq, t, d = query.shape
    s = key.shape[2]
    qpos, kpos = torch.arange(s - t, s, device=query.device), torch.arange(s, device=query.device)
    allowed = sliding_allowed(qpos, kpos, sliding_window) if sliding_window else causal_allowed(qpos, kpos)
    if getattr(scaling, "softcap", None) is None and sinks is None:
        o = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                             scale=float(scaling), enable_gqa=hq != key.shape[1])
        return o.transpose(1, 2)
    o, lse = partial(query, key, value, scaling, None if bool(allowed.all()) else allowed)
    return with_sinks(o, lse, sinks).transpose(1, 2).to(query.dtype)


def with_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None, heads=None) -> torch.Tensor:
    """A partial result over every key (o [B, h, t, D], lse [B, h, t]) with the sink logits of its query heads
    (sinks [H_q], `heads` the index of these h heads, None: all) in the softmax's denominator: o · σ(lse − sink)."""
    if sinks is None:
        return o
    sink = sinks.float() if heads is None else sinks.float()[heads]
    return o * torch.sigmoid(lse - sink.view(1, -1, 1)).unsqueeze(-1)


def attend_layer(layer, query: torch.Tensor, scaling: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query [B, H_q, t, D] over a StoreLayer's stores → [B, t, H_q, D] in query.dtype."""
    b, hq, t, d = query.shape
    k, v, pos = layer.pending                                            # [B, H_kv, t, D] ×2, [t]
    groups = layer.groups
    out = None if len(groups) == 1 and groups[0].q_heads is None and sinks is None else query.new_empty(b, t, hq, d)
    plain = getattr(scaling, "softcap", None) is None and sinks is None   # what the fused kernels compute
    fused = t == 1 and layer.backend == "cupy" and plain
    for group in groups:
        store = group.store
        q_sel, kv_sel = _selectors(group)                                # slices where the heads are a range
        q = query[:, q_sel]
        kn, vn = k[:, kv_sel], v[:, kv_sel]
        if fused and getattr(store, "fused_ok", lambda: False)() and fused_shapes_ok(store, d):
            store.append(kn, vn, pos)
            o = store.fused_decode(q[:, :, 0], float(scaling)).unsqueeze(1)    # [B, 1, h·G, D]
        else:
            o, lse = store.attend(q, pos, scaling, new=(kn, vn))         # [B, h·G, t, D] float32, [B, h·G, t]
            store.append(kn, vn, pos)
            o = with_sinks(o, lse, sinks, group.q_heads).transpose(1, 2)
        if out is None:                                                  # one store over every head
            out = o.to(query.dtype).contiguous()
        else:
            out[:, :, q_sel] = o
    layer.pending = None
    return out


def _selectors(group) -> tuple:
    """(query heads, KV heads) of a HeadGroup as indices for `x[:, sel]`: a slice when the heads are consecutive (a
    view instead of a gather), else the index tensor; computed once per group."""
    sel = getattr(group, "_selectors", None)
    if sel is None:
        sel = (_as_index(group.q_heads), _as_index(group.kv_heads))
        group._selectors = sel
    return sel


def _as_index(heads: torch.Tensor | None):
    if heads is None:
        return slice(None)
    first = int(heads[0]) if len(heads) else 0
    if torch.equal(heads.cpu(), torch.arange(first, first + len(heads))):
        return slice(first, first + len(heads))
    return heads


def fused_shapes_ok(store, head_dim: int) -> bool:
    """What the CuPy kernels accept (cupy_kernels/kernels.py): head_dim 32/64/128/256, 16-bit stores, value groups a
    power of two in 8..256. Anything else stays on the torch path."""
    value = getattr(store, "value", None)
    group = value.group if value is not None else 32
    return (head_dim in (32, 64, 128, 256) and store.dtype in (torch.float16, torch.bfloat16)
            and 8 <= group <= 256 and group & (group - 1) == 0)


def kvtool_mask(*args, attention_mask=None, **kwargs):
    """The mask hook transformers calls for the "kvtool" attention: masks are built inside the stores from token
    positions, so this returns None; a padding mask with any masked token is refused (one line, no wrong output).
    Its other arguments (sizes, offsets, cache_position) differ between transformers 5.x releases and are unused."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise KvtoolError("padded batches are not supported by the kvtool attention; batch prompts of equal length "
                          "without padding, or use batch size 1")
    return None


def use_kvtool_attention(model) -> None:
    """Switch `model` to the kvtool attention (needed with a CompressedCache)."""
    model.set_attn_implementation(KVTOOL_ATTENTION)


# -- the trace's attention (kvtool.trace) ------------------------------------------------------------------------
TRACE_OBSERVERS: list = []   # kvtool.trace's active traces, each with .forward(module, query, key, value, mask, ...)


def trace_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Exact attention output, with the inputs seen on the side: the innermost entry of TRACE_OBSERVERS (pushed by
    kvtool.trace.observing) computes it (`.forward`, kvtool.trace.trace_forward); plain sdpa when none is active."""
    if TRACE_OBSERVERS:
        return TRACE_OBSERVERS[-1].forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def exact_attention(module, query, key, value, mask, scaling=None, capped=None, **kwargs):
    """sdpa, or for a model with logit soft-capping (Gemma 2; sdpa has none) `capped` (the trace's exact capped
    softmax, kvtool.trace.capped_attention, handed in by the caller); a model with attention sinks (s_aux) is refused
    in one line (training and tracing do not handle them yet)."""
    if kwargs.get("s_aux") is not None:
        raise KvtoolError(f"attention sinks (s_aux) are not handled by kvtool's trace and duo yet "
                          f"({type(module).__name__})")
    if kwargs.get("softcap") is not None:
        if capped is None:
            raise KvtoolError(f"logit soft-capping needs the exact capped attention ({type(module).__name__})")
        return capped(query, key, value, mask, scaling, kwargs["softcap"])
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


# -- DuoAttention's gated attention (calibrate/duo.py, arXiv 2410.10819) ----------------------------------------
class DuoState:
    """What the duo attention function needs: gates [L, H_kv], `dims` (anything with .group, e.g. kvtool.trace.Dims),
    the training windows, the mode ("teacher" | "student"), and the teacher's per-layer full outputs."""

    def __init__(self, gates, dims, sink: int, recent: int, full_branch: str):
        self.gates, self.dims, self.sink, self.recent, self.full_branch = gates, dims, sink, recent, full_branch
        self.mode = "teacher"
        self.capped = None                  # exact soft-capped attention (kvtool.trace.capped_attention), set by duo
        self.native = "sdpa"                # the model's own attention implementation, set by duo
        self.teacher: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def streaming_mask(self, t: int, s: int, device) -> torch.Tensor:
        """Λ mask [1, 1, T, S] (True = attend): causal, and key in the first `sink` or the last `recent` tokens."""
        key = (t, s, str(device))
        if key not in self._masks:
            qpos, kpos = torch.arange(s - t, s, device=device), torch.arange(s, device=device)
            self._masks[key] = window_allowed(qpos, kpos, self.sink, self.recent).view(1, 1, t, s)
        return self._masks[key]


DUO_STATES: list[DuoState] = []


def duo_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Teacher: exact attention (output kept). Student: α·full + (1 − α)·streaming per KV head (out: [B, T, H_q, D])."""
    state = DUO_STATES[-1]
    layer = module.layer_idx
    if state.mode == "teacher":
        out, _ = exact_attention(module, query, key, value, attention_mask, scaling=scaling,
                                 capped=state.capped, **kwargs)
        if state.full_branch == "teacher":
            state.teacher[layer] = out.detach()
        return out, None
    lam = state.streaming_mask(query.shape[2], key.shape[2], query.device)
    mask = lam if attention_mask is None else (attention_mask.bool() & lam)
    stream, _ = exact_attention(module, query, key, value, mask, scaling=scaling, capped=state.capped,
                                **kwargs)
    if state.full_branch == "teacher":
        full = state.teacher[layer]
    else:
        full, _ = exact_attention(module, query, key, value, attention_mask, scaling=scaling,
                                 capped=state.capped, **kwargs)
    alpha = state.gates[layer].clamp(0, 1).repeat_interleave(state.dims.group).view(1, 1, -1, 1)   # [1, 1, H_q, 1]
    return alpha * full + (1 - alpha) * stream, None


@contextmanager
def switched(model, name: str, stack: list, item):
    """Run `model` with the registered attention `name`, `item` on top of `stack` (TRACE_OBSERVERS or DUO_STATES);
    the model's previous attention is restored afterwards (also on errors)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    stack.append(item)
    try:
        yield
    finally:
        stack.remove(item)
        model.set_attn_implementation(previous)


# -- registration with transformers: the only place -------------------------------------------------------------
AttentionInterface.register(KVTOOL_ATTENTION, kvtool_attention)
AttentionMaskInterface.register(KVTOOL_ATTENTION, kvtool_mask)
AttentionInterface.register(TRACE_ATTENTION, trace_attention)
AttentionMaskInterface.register(TRACE_ATTENTION, sdpa_mask)
AttentionInterface.register(DUO_ATTENTION, duo_attention)
AttentionMaskInterface.register(DUO_ATTENTION, sdpa_mask)
