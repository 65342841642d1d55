"""From a profile and a policy to each layer's key and value quantization formats (ranges, codebooks, RoPE)."""

from __future__ import annotations

import math

import torch

from kvtool import quant, sections
from kvtool.errors import KvtoolError
from kvtool.kvstore import KeyFormat, RopeTable, ValueFormat
from kvtool.modelinfo import has_rope


def quant_formats(model, profile, policy, dims, retrieval: torch.Tensor) -> list[tuple]:
    """[(KeyFormat | None, ValueFormat | None)] per layer; None where that tensor stays in 16 bits.

    retrieval: bool [L, H_kv]; each layer's formats cover only its retrieval heads (streaming heads stay 16-bit)."""
    keys = _key_formats(model, profile, policy, dims, retrieval) if policy.k < 16 else [None] * dims.layers
    values = _value_formats(profile, policy, dims, retrieval) if policy.v < 16 else [None] * dims.layers
    return list(zip(keys, values))


def _codebook(profile, name: str, bits: int, policy) -> torch.Tensor | None:
    """[L, H, 2^b] k-means levels from `kvtool calibrate --method kvquant`, checked against the policy."""
    if policy.codebook != "kmeans":
        return None
    key = sections.quant_levels(name, bits)
    if profile is None or key not in profile:
        raise KvtoolError(f"policy codebook=kmeans: the profile has no {key} "
                          f"(run kvtool calibrate --method kvquant --bits {bits})")
    made = profile.calibration.get("methods", {}).get("kvquant", {})
    for field, want in (("kclip", policy.kclip), ("vgroup", policy.vgroup)):
        if field in made and float(made[field]) != float(want):
            raise KvtoolError(f"policy codebook=kmeans: the codebooks were learned with {field}={made[field]}, "
                              f"the policy asks for {field}={want}")
    return profile[key].float()


def _key_formats(model, profile, policy, dims, retrieval) -> list[KeyFormat]:
    if profile is None:
        raise KvtoolError(f"policy k={policy.k}: key quantization uses calibrated per-channel ranges; give a profile "
                          "(kvtool profile makes one)")
    if dims.head_dim % 8:
        raise KvtoolError(f"head_dim {dims.head_dim} is not a multiple of 8; keys cannot be packed")
    rope = None
    if policy.krope == "pre":
        rope = RopeTable.of(model, dims.head_dim)
        if rope is None:
            raise KvtoolError(f"policy krope=pre needs a model with a full-width rotary embedding; "
                              f"{type(model).__name__} has {'a partial one' if has_rope(model) else 'no RoPE (its keys carry no rotation)'}: "
                              "use krope=post")
    lo, hi = quant.key_range(profile, policy.krope, policy.kclip)             # [L, H, D]
    levels = _codebook(profile, f"key_{policy.krope}", policy.k, policy)     # [L, H, 2^b] or None
    out = []
    for layer in range(dims.layers):
        r = retrieval[layer].nonzero().view(-1)
        lv = None if levels is None else levels[layer, r]
        out.append(KeyFormat(quant.ChannelQuantizer.from_range(lo[layer, r], hi[layer, r], policy.k, lv),
                             rope, policy.outliers))
    return out


def _value_formats(profile, policy, dims, retrieval) -> list[ValueFormat]:
    default = type(policy)().vgroup
    # the default group narrows to a narrower head; a vgroup the user chose must divide head_dim exactly
    group = dims.head_dim if policy.vgroup == default and dims.head_dim < default else policy.vgroup
    if dims.head_dim % group:
        raise KvtoolError(f"policy vgroup={policy.vgroup} does not divide head_dim {dims.head_dim}; use a divisor "
                          f"of {dims.head_dim} such as {math.gcd(dims.head_dim, 32)}")
    if dims.head_dim % 8:
        raise KvtoolError(f"head_dim {dims.head_dim} is not a multiple of 8; values cannot be packed")
    levels = _codebook(profile, "value", policy.v, policy)
    return [ValueFormat(policy.v, group, None if levels is None else levels[layer, retrieval[layer].nonzero().view(-1)])
            for layer in range(dims.layers)]
