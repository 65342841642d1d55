"""From per-head scores to a retrieval mask: the one rule shared by the runtime (policy `heads=<method>:<f>`) and by
the calibration methods. A low module: it imports nothing from the runtime or from calibrate/."""

from __future__ import annotations

import math

import torch

from kvtool.errors import KvtoolError


def check_fraction(fraction: float) -> float:
    if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
        raise KvtoolError(f"--retrieval-fraction must lie in [0, 1] (got {fraction})")
    return fraction


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """uint8 mask [L, H] of the round(fraction · L·H) highest scores, over all heads at once (a global quantile).

    Ties break deterministically: the earlier (layer, head) in row-major order wins.
    """
    check_fraction(fraction)
    flat = scores.reshape(-1).double()
    k = int(round(fraction * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    mask = torch.zeros(flat.numel(), dtype=torch.uint8)
    mask[order[:k]] = 1
    return mask.view(scores.shape)


def top_count(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Like top_fraction but rounding the count up (at least one head when fraction > 0), as RazorAttention does."""
    k = math.ceil(fraction * scores.numel() - 1e-9)
    return top_fraction(scores, min(1.0, k / scores.numel()))
