"""The "kvtool" attention: transformers' attention function and mask hook for a `CompressedCache`, registered here
(AttentionInterface / AttentionMaskInterface) and nowhere else.

At each attention call a layer of the cache holds the new chunk's exact keys/values (`StoreLayer.pending`). For every
group of KV heads, its store gives a partial result over what it holds plus the new chunk read exactly (so a chunk's
own tokens are never read back quantized), then the chunk is appended to the store; groups write disjoint query
heads. A decode step on the "cupy" backend appends first and calls the store's fused kernel instead.
With any other cache (no layer tag on `key`) the function is plain causal sdpa, so a model switched to "kvtool" keeps
working with a DynamicCache or no cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvtool.errors import KvtoolError
from kvtool.stores.base import Scaling, partial
from kvtool.windows import causal_allowed, sliding_allowed

KVTOOL_ATTENTION = "kvtool"


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
    out = query.new_empty(b, t, hq, d)
    plain = getattr(scaling, "softcap", None) is None and sinks is None   # what the fused kernels compute
    fused = t == 1 and layer.backend == "cupy" and plain
    for group in layer.groups:
        store, q = group.store, query if group.q_heads is None else query[:, group.q_heads]
        kn = k if group.kv_heads is None else k[:, group.kv_heads]
        vn = v if group.kv_heads is None else v[:, group.kv_heads]
        dst = slice(None) if group.q_heads is None else group.q_heads
        if fused and getattr(store, "fused_ok", lambda: False)() and fused_shapes_ok(store, d):
            store.append(kn, vn, pos)
            out[:, 0, dst] = store.fused_decode(q[:, :, 0], float(scaling)).to(out.dtype)
            continue
        o, lse = store.attend(q, pos, scaling, new=(kn, vn))              # [B, h·G, t, D] float32, [B, h·G, t]
        store.append(kn, vn, pos)
        out[:, :, dst] = with_sinks(o, lse, sinks, group.q_heads).transpose(1, 2).to(out.dtype)
    layer.pending = None
    return out


def fused_shapes_ok(store, head_dim: int) -> bool:
    """What the CuPy kernels accept (cupy_kernels/kernels.py): head_dim 32/64/128/256, 16-bit stores, value groups a
    power of two in 8..256. Anything else stays on the torch path."""
    value = getattr(store, "value", None)
    group = value.group if value is not None else 32
    return (head_dim in (32, 64, 128, 256) and store.dtype in (torch.float16, torch.bfloat16)
            and 8 <= group <= 256 and group & (group - 1) == 0)


def kvtool_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """The mask hook transformers calls for the "kvtool" attention: masks are built inside the stores from token
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
