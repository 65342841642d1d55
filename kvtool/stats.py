"""Typed, mergeable accumulators for traced statistics.

Every accumulator is a sum over samples: two accumulators filled from disjoint shards of the data `merge` into
exactly what one accumulator filled from all of it holds (counts and histograms are integers, so their merge is
exact; float sums are float64, so a merge equals the whole-data pass up to float64 summation order, ~1e-12 relative).

Each accumulator is a dataclass of tensors and a per-field merge rule ("sum", "min" or "max"); `state()` and
`from_state()` turn it into flat tensors for the profile's `stats.*` section and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# Histogram of per-channel values on an asinh scale: bins are uniform in u = asinh(x / HIST_SCALE) over
# [-HIST_U, HIST_U], which covers the whole fp16 range. Near zero a bin is ~0.002 wide; far from zero a bin
# spans ~6% of the value, and quantiles interpolate linearly inside a bin (then clamp to the exact min/max).
HIST_BINS = 512
HIST_SCALE = 1.0 / 32.0
HIST_U = math.asinh(65504.0 / HIST_SCALE)


class Accumulator:
    """Base: field-wise merge by rule, flat state for serialisation."""

    rules: dict[str, str] = {}

    def merge(self, other: "Accumulator") -> "Accumulator":
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a.shape != b.shape:
                raise ValueError(f"{type(self).__name__}.{f.name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
            rule = self.rules.get(f.name, "sum")
            merged = a + b if rule == "sum" else torch.minimum(a, b) if rule == "min" else torch.maximum(a, b)
            setattr(self, f.name, merged)
        return self

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str):
        return cls(**{f.name: tensors[f"{prefix}.{f.name}"].clone() for f in fields(cls)})


@dataclass
class Mean(Accumulator):
    """Running mean per index: `total` and `count` of the same shape (e.g. [L, H_q])."""

    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, *shape: int) -> "Mean":
        return cls(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))

    def add(self, index, total: torch.Tensor, count: float | torch.Tensor) -> None:
        # the accumulators stay on the CPU; a model on a GPU (or split over several) hands in its own device's values
        self.total[index] += total.to(self.total.device, torch.float64)
        self.count[index] += count.to(self.count.device) if isinstance(count, torch.Tensor) else count

    def value(self) -> torch.Tensor:
        """Mean where anything was counted, 0 elsewhere; float32."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1e-300), 0.0).float()


@dataclass
class ChannelRange(Accumulator):
    """Per-channel min, max and an asinh-scale histogram (for quantiles). Shapes [L, H_kv, D] and [L, H_kv, D, B]."""

    lo: torch.Tensor
    hi: torch.Tensor
    hist: torch.Tensor
    rules = {"lo": "min", "hi": "max", "hist": "sum"}

    @classmethod
    def empty(cls, layers: int, heads: int, dim: int) -> "ChannelRange":
        shape = (layers, heads, dim)
        return cls(torch.full(shape, math.inf), torch.full(shape, -math.inf),
                   torch.zeros(*shape, HIST_BINS, dtype=torch.int64))

    def add(self, layer: int, x: torch.Tensor) -> None:
        """x: [N, H_kv, D] values of one layer (N tokens)."""
        x = x.detach().float()
        lo, hi = torch.aminmax(x, dim=0)
        self.lo[layer] = torch.minimum(self.lo[layer], lo.to(self.lo.device))
        self.hi[layer] = torch.maximum(self.hi[layer], hi.to(self.hi.device))
        heads, dim = x.shape[1:]
        bins = _bin_index(x)                                                   # [N, H, D]
        flat = bins + torch.arange(heads * dim, device=x.device).view(heads, dim) * HIST_BINS   # channel-major bin id
        counts = torch.bincount(flat.reshape(-1), minlength=heads * dim * HIST_BINS)
        self.hist[layer] += counts.view(heads, dim, HIST_BINS).to(self.hist.device)

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def quantiles(self, levels: list[float]) -> torch.Tensor:
        """[L, H_kv, D, Q] estimates of the given quantile levels from the histograms, clamped to [lo, hi]."""
        hist = self.hist.to(torch.float64)
        cum = hist.cumsum(-1)                                                  # [..., B]
        total = cum[..., -1:]
        edges = _bin_edges()                                                   # [B + 1] in value space
        out = []
        for q in levels:
            target = q * total                                                 # [..., 1]
            idx = torch.searchsorted(cum, target).clamp(max=HIST_BINS - 1)     # first bin reaching target
            before = torch.where(idx > 0, cum.gather(-1, (idx - 1).clamp_min(0)), 0.0)
            inside = hist.gather(-1, idx)
            frac = ((target - before) / inside.clamp_min(1)).clamp(0, 1)
            value = edges[idx] + frac * (edges[idx + 1] - edges[idx])
            out.append(value.squeeze(-1))
        qs = torch.stack(out, -1).float()
        qs = torch.maximum(torch.minimum(qs, self.hi.unsqueeze(-1)), self.lo.unsqueeze(-1))
        return torch.where(total > 0, qs, 0.0)


@dataclass
class Moments(Accumulator):
    """Count, sum and sum of outer products per (layer, head), float64: enough for mean, covariance and PCA."""

    n: torch.Tensor       # [L, H]
    s: torch.Tensor       # [L, H, D]
    ss: torch.Tensor      # [L, H, D, D]

    @classmethod
    def zeros(cls, layers: int, heads: int, dim: int) -> "Moments":
        f64 = torch.float64
        return cls(torch.zeros(layers, heads, dtype=f64), torch.zeros(layers, heads, dim, dtype=f64),
                   torch.zeros(layers, heads, dim, dim, dtype=f64))

    def add(self, layer: int, x: torch.Tensor) -> None:
        """x: [N, H, D] of one layer."""
        # One sample's sums in float32 (N ~ thousands: ~1e-6 relative), accumulated across samples in float64.
        x = x.detach().float().transpose(0, 1)                                 # [H, N, D]
        self.n[layer] += x.shape[1]
        self.s[layer] += x.sum(1).double().to(self.s.device)
        self.ss[layer] += (x.transpose(1, 2) @ x).double().to(self.ss.device)

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [L,H,D], eigenvalues [L,H,D] descending, basis [L,H,D,D] with eigenvectors as columns), float32.

        Eigen-decomposition of the covariance (the mean-centred second moment): the same components
        scikit-learn's PCA finds on the raw samples, computed from mergeable moments instead.
        """
        n = self.n.clamp_min(1).unsqueeze(-1)
        mean = self.s / n
        cov = self.ss / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(cov)                                   # ascending
        evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
        evecs = evecs * torch.where(evecs.sum(-2, keepdim=True) < 0, -1.0, 1.0)  # deterministic sign
        return mean.float(), evals.float(), evecs.float()


def _bin_index(x: torch.Tensor) -> torch.Tensor:
    u = torch.asinh(x / HIST_SCALE)
    idx = torch.floor((u + HIST_U) * (HIST_BINS / (2 * HIST_U)))
    return idx.clamp(0, HIST_BINS - 1).long()


def _bin_edges() -> torch.Tensor:
    u = torch.linspace(-HIST_U, HIST_U, HIST_BINS + 1, dtype=torch.float64)
    return torch.sinh(u) * HIST_SCALE
