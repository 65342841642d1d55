"""From a profile's `lowrank.` section and a policy's `krank` / `vrank` to each layer's key and value latents (the
low-rank store, kvtool/stores/lowrank.py). The companion of kvtool.quant_setup.quant_formats."""

from __future__ import annotations

import torch

from kvtool import quant
from kvtool.errors import KvtoolError
from kvtool.kvstore import RopeTable
from kvtool.modelinfo import has_rope
from kvtool.lowrank import NAMES, SECTION, LowRank, choose_rank
from kvtool.stores.lowrank import Latent

HINT = "run kvtool calibrate --method pca --profile P"


def uses_lowrank(policy) -> bool:
    return policy.krank is not None or policy.vrank is not None


def latent_ranges(profile, lr: LowRank, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent ranges (lo, hi) [L, H, D] for a kclip level: 1 → the traced min / max, the level pca was calibrated
    at → its quantiles; any other level is refused (the section holds only these two)."""
    if clip >= 1.0:
        return lr.lo.float(), lr.hi.float()
    made = profile.calibration.get("methods", {}).get("pca", {}).get("clip")
    if made is not None and abs(float(made) - clip) > 1e-9:
        raise KvtoolError(f"policy kclip={clip:g}: the latent ranges were calibrated at clip={float(made):g} "
                          f"(use kclip={float(made):g} or kclip=1, or re-run calibrate --method pca --clip {clip:g})")
    return lr.qlo.float(), lr.qhi.float()


def lowrank_formats(model, profile, policy, dims, retrieval: torch.Tensor) -> list[tuple | None]:
    """[(key Latent, value Latent, RopeTable) | None] per layer: None where the layer has no retrieval head or the
    policy sets neither `krank` nor `vrank`. retrieval: bool [L, H_kv]; a layer's latents cover its retrieval heads.

    The rank of a layer is the largest rank its retrieval heads ask for (`auto:E` per head, kvtool.lowrank.
    choose_rank per="head"); an unset rank is head_dim. A quantized latent's rank is rounded up to a multiple of 8."""
    if not uses_lowrank(policy):
        return [None] * dims.layers
    spec = policy.krank if policy.krank is not None else policy.vrank
    name = "krank" if policy.krank is not None else "vrank"
    if profile is None:
        raise KvtoolError(f"policy {name}={spec} needs a profile with a {SECTION} section ({HINT})")
    if any(f"{SECTION}.{n}.basis" not in profile for n in NAMES):
        raise KvtoolError(f"policy {name}={spec}: the profile has no {SECTION} section ({HINT})")
    rope = RopeTable.of(model, dims.head_dim)
    if rope is None and has_rope(model):
        raise KvtoolError(f"policy {name}={spec} keeps keys pre-RoPE and needs a full-width rotary embedding; "
                          f"{type(model).__name__}'s is partial")                # none at all (GPT-2): keys as they are
    if dims.head_dim % 8 and (policy.k < 16 or policy.v < 16):
        raise KvtoolError(f"head_dim {dims.head_dim} is not a multiple of 8; a latent cannot be packed")
    kinds = {}
    for kind, field, rank_spec, bits in (("key", "krank", policy.krank, policy.k),
                                         ("value", "vrank", policy.vrank, policy.v)):
        lr = LowRank.from_tensors(profile, kind)
        if tuple(lr.basis.shape) != (dims.layers, dims.kv_heads, dims.head_dim, dims.head_dim):
            raise KvtoolError(f"{SECTION}.{kind}.basis has shape {list(lr.basis.shape)}, not the model's "
                              f"[{dims.layers}, {dims.kv_heads}, {dims.head_dim}, {dims.head_dim}] ({HINT})")
        ranks = choose_rank(lr.eigvals.float(), rank_spec if rank_spec is not None else dims.head_dim,
                            per="head", name=field)                                   # [L, H]
        lo, hi = latent_ranges(profile, lr, policy.kclip) if bits < 16 else (None, None)
        kinds[kind] = (lr, ranks, lo, hi, bits)
    out = []
    for layer in range(dims.layers):
        heads = retrieval[layer].nonzero().view(-1)
        if not len(heads):
            out.append(None)
            continue
        pair = []
        for kind in NAMES:
            lr, ranks, lo, hi, bits = kinds[kind]
            r = int(ranks[layer, heads].max())
            pair.append(latent(lr, layer, heads, r, bits, lo, hi))
        out.append((pair[0], pair[1], rope))
    return out


def latent(lr: LowRank, layer: int, heads: torch.Tensor, r: int, bits: int = 16, lo: torch.Tensor | None = None,
           hi: torch.Tensor | None = None) -> Latent:
    """The Latent of one layer's `heads` [h] at rank r: mean [h, D], the first r basis columns [h, D, r], and with
    bits < 16 a uniform quantizer over the ranges lo / hi [L, H, D] (first r coordinates). A quantized latent's rank
    is rounded up to a multiple of 8 (packing), at most head_dim."""
    d = lr.basis.shape[-1]
    if bits < 16:
        r = min(d, -(-r // 8) * 8)
    basis = lr.basis[layer, heads][..., :r].float().contiguous()                       # [h, D, r]
    qz = None
    if bits < 16:
        qz = quant.ChannelQuantizer.from_range(lo[layer, heads, :r].float(), hi[layer, heads, :r].float(), bits)
    return Latent(lr.mean[layer, heads].float().contiguous(), basis, qz)


def layer_ranks(formats) -> list[tuple[int, int] | None]:
    """(key rank, value rank) per layer of `lowrank_formats`' result (None where the layer has no latent)."""
    return [None if f is None else (f[0].rank, f[1].rank) for f in formats]
