"""Low-rank keys and values: the math the runtime and `calibrate/pca.py` share (no calibration imports here).

A PCA basis per layer and KV head (mean m [D], eigenvectors U [D, D] as columns, eigenvalues λ [D] descending) turns
a key or value x [D] into a latent z = (x − m) @ U[:, :r] [r] and back: x̂ = z @ U[:, :r]ᵀ + m. Over the data the basis
was fitted on, the mean squared error per vector, summed over channels, is Σ_{i>r} λ_i (the discarded eigenvalue
mass); `tests/test_lowrank.py` checks that. Keys are kept pre-RoPE (Palu arXiv 2407.21118, ShadowKV): RoPE is a
position-dependent rotation, so it is applied after reconstruction. Values never need reconstructing one by one:
the attention output Σ_j p_j x̂_j = (Σ_j p_j z_j) @ U[:, :r]ᵀ + (Σ_j p_j) m, so the weighted sum runs in the latent
and one projection follows (Eigen Attention; `weighted_values`), exact for any weights.

Rank specs (policy fields such as `krank=` / `vrank=`): an integer r (1 ≤ r ≤ head_dim), or `auto:E` with E in (0, 1]:
the smallest rank whose kept energy Σ_{i≤r} λ_i / Σ λ_i is at least E. `choose_rank` returns one rank per
[layer, KV head]; by default the rank is chosen per layer (the largest of the layer's KV heads, so every head keeps
at least E and a layer's latent is one [B, H, T, r] tensor); `per="head"` gives each KV head its own.

Profile section written by `kvtool calibrate --method pca` (see SECTION / FIELDS and docs/profile-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.errors import KvtoolError

SECTION = "lowrank"
NAMES = ("key", "value")              # key = pre-RoPE keys (the trace's `key_pre`), value = values
SOURCE = {"key": "key_pre", "value": "value"}
FIELDS = ("mean", "eigvals", "basis", "lo", "hi", "qlo", "qhi")   # required; `power` [L, H, D] is optional
ENERGY_TOL = 1e-6                     # kept energy this close below the target counts as reaching it (float sums)


@dataclass(frozen=True)
class RankSpec:
    """A parsed rank spec: a fixed `rank`, or the kept `energy` fraction (exactly one is set)."""

    rank: int | None = None
    energy: float | None = None

    def __str__(self) -> str:
        return str(self.rank) if self.rank is not None else f"auto:{self.energy:g}"


def parse_rank(spec, head_dim: int, name: str = "rank") -> RankSpec:
    """`32`, `"32"` or `"auto:0.99"` → RankSpec; a one-line KvtoolError for anything else."""
    if isinstance(spec, RankSpec):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text.startswith("auto:"):
        try:
            energy = float(text[5:])
        except ValueError:
            raise KvtoolError(f"{name}={spec}: the energy after auto: must be a number in (0, 1], e.g. auto:0.99") from None
        if not 0.0 < energy <= 1.0:
            raise KvtoolError(f"{name}={spec}: the energy must lie in (0, 1] (got {energy:g})")
        return RankSpec(energy=energy)
    try:
        rank = int(text)
    except ValueError:
        raise KvtoolError(f"{name}={spec}: give a rank (an integer) or auto:ENERGY, e.g. {name}=32 or "
                          f"{name}=auto:0.99") from None
    if rank < 1:
        raise KvtoolError(f"{name}={rank}: the rank must be at least 1")
    if rank > head_dim:
        raise KvtoolError(f"{name}={rank} is larger than head_dim {head_dim}")
    return RankSpec(rank=rank)


def energy(eigvals: torch.Tensor) -> torch.Tensor:
    """Kept-energy fraction [..., D] of ranks 1..D: cumsum(λ) / Σλ (float64; 1 everywhere for an all-zero spectrum)."""
    ev = eigvals.double().clamp_min(0)
    total = ev.sum(-1, keepdim=True)
    cum = ev.cumsum(-1)
    return torch.where(total > 0, cum / total.clamp_min(1e-300), torch.ones_like(cum))


def choose_rank(eigvals: torch.Tensor, spec, per: str = "layer", name: str = "rank") -> torch.Tensor:
    """Ranks [L, H] (int64) for eigenvalues [L, H, D] (descending) and a spec (int, "32" or "auto:0.99").

    A fixed rank is the same everywhere. `auto:E`: per KV head the smallest r with kept energy ≥ E; with
    per="layer" (default) every head of a layer then takes the layer's largest such r."""
    if eigvals.dim() != 3:
        raise KvtoolError(f"eigenvalues must be [layers, kv_heads, head_dim] (got {list(eigvals.shape)})")
    if per not in ("layer", "head"):
        raise KvtoolError(f"rank choice per {per!r}: give layer or head")
    L, H, D = eigvals.shape
    parsed = parse_rank(spec, D, name)
    if parsed.rank is not None:
        return torch.full((L, H), parsed.rank, dtype=torch.long)
    cum = energy(eigvals)                                                   # [L, H, D]
    ranks = (cum < parsed.energy - ENERGY_TOL).sum(-1) + 1                  # first r reaching the energy
    ranks = ranks.clamp(1, D)
    if per == "layer":
        ranks = ranks.amax(-1, keepdim=True).expand(L, H).contiguous()
    return ranks


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, r: int) -> torch.Tensor:
    """Latent z = (x − mean) @ basis[..., :, :r].

    x [..., T, D]; mean broadcastable to x (e.g. [H, 1, D] for x [B, H, T, D]); basis [..., D, D] broadcastable as a
    matrix batch (e.g. [H, D, D]) → z [..., T, r]."""
    return (x - mean) @ basis[..., :, :r]


def reconstruct(z: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x̂ = z @ basis[..., :, :r]ᵀ + mean with r = z.shape[-1]: z [..., T, r] → [..., T, D]."""
    r = z.shape[-1]
    return z @ basis[..., :, :r].transpose(-1, -2) + mean


def weighted_values(p: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Σ_j p_j x̂_j computed in the latent: (p @ z) @ basis[:, :r]ᵀ + (Σ_j p_j) · mean.

    p [..., t, S] attention weights (any weights; rows need not sum to 1), z [..., S, r] latent values, mean and
    basis as for `reconstruct` → [..., t, D]. Equals p @ reconstruct(z, mean, basis) up to float rounding."""
    r = z.shape[-1]
    return (p @ z) @ basis[..., :, :r].transpose(-1, -2) + p.sum(-1, keepdim=True) * mean


def discarded_mass(eigvals: torch.Tensor, r: int) -> torch.Tensor:
    """Σ_{i>r} λ_i [...]: the expected squared reconstruction error (channel sum) of a rank-r projection."""
    return eigvals[..., r:].double().clamp_min(0).sum(-1)


@dataclass
class LowRank:
    """One kind (key or value) of the `lowrank.` section: mean [L, H, D], eigvals [L, H, D], basis [L, H, D, D],
    latent ranges lo / hi (min / max) and qlo / qhi (clipped quantiles), all [L, H, D] indexed by latent coordinate."""

    mean: torch.Tensor
    eigvals: torch.Tensor
    basis: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    qlo: torch.Tensor
    qhi: torch.Tensor

    @classmethod
    def from_tensors(cls, tensors: dict, name: str) -> "LowRank":
        """Read `lowrank.<name>.*` from a profile's tensor dict (or a Profile: anything with `in` and `[]`)."""
        if name not in NAMES:
            raise KvtoolError(f"low-rank kind must be one of {', '.join(NAMES)} (got {name!r})")
        missing = [f for f in FIELDS if f"{SECTION}.{name}.{f}" not in tensors]
        if missing:
            raise KvtoolError(f"profile has no {SECTION}.{name} section (missing {', '.join(missing)}); "
                              "run `kvtool calibrate --method pca --profile ...` first")
        return cls(**{f: tensors[f"{SECTION}.{name}.{f}"] for f in FIELDS})
