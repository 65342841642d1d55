"""From scores to what is kept, the rules shared by the runtime and the calibration methods: per-head scores to a
retrieval mask (policy `heads=<method>:<f>`), and SnapKV's token selection (window votes, pooling, top tokens; the
SnapKV store and calibrate --method snapkv). A low module: it imports nothing from the runtime or from calibrate/."""

from __future__ import annotations

import math

import torch

from kvtool.errors import KvtoolError
from kvtool.scores import softcap_


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


# -- SnapKV's selection (kvtool/stores/snapkv.py at run time, calibrate/snapkv.py to choose its window and kernel) --
def pooled_votes(votes: torch.Tensor, kernel: int, pool: str) -> torch.Tensor:
    """votes [..., n] → the same shape pooled along n (stride 1, `kernel` odd, same length)."""
    shape = votes.shape
    x = votes.reshape(-1, 1, shape[-1])
    if kernel > 1:
        f = torch.nn.functional.max_pool1d if pool == "max" else torch.nn.functional.avg_pool1d
        kw = {} if pool == "max" else {"count_include_pad": False}
        x = f(x, kernel, stride=1, padding=kernel // 2, **kw)
    return x.reshape(shape)


def window_votes(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, scaling) -> torch.Tensor:
    """Softmax attention of the window's queries q [B, h·G, w, D] over keys k [B, h, n, D] (causal by positions
    qpos [w], kpos [n]), summed over the window → votes [B, h, G, n] (float32)."""
    b, hq, w, d = q.shape
    h = k.shape[1]
    s = torch.matmul(q.float().view(b, h, hq // h, w, d), k.float().unsqueeze(2).transpose(-1, -2))   # [B,h,G,w,n]
    softcap_(s.mul_(scaling), scaling)
    s.masked_fill_(kpos.view(1, -1) > qpos.view(-1, 1), float("-inf"))
    return s.softmax(-1).sum(3)


def snap_select(votes: torch.Tensor, n: int, window: int, keep: int, kernel: int, pool: str,
                per_query: bool) -> torch.Tensor:
    """Indices [B, h', keep] (increasing) of the tokens to keep of n, from votes [B, h, G, n]: the last `window`
    tokens, plus the top keep - window of the earlier ones by pooled votes, summed over G (SnapKV++, h' = h) or per
    query head (SnapKV, h' = h·G)."""
    b, h, g, _ = votes.shape
    prefix = n - window
    dev = votes.device
    if keep <= window:                                        # only the most recent tokens fit
        last = torch.arange(n - keep, n, device=dev)
        return last.view(1, 1, -1).expand(b, h * g if per_query else h, -1)
    score = pooled_votes(votes[..., :prefix], kernel, pool)                              # [B, h, G, prefix]
    score = score.reshape(b, h * g, prefix) if per_query else score.sum(2)
    top = score.topk(keep - window, -1).indices.sort(-1).values
    win = torch.arange(prefix, n, device=dev).view(1, 1, -1).expand(b, top.shape[1], -1)
    return torch.cat([top, win], 2)
