"""The score algebra of attention, shared by the runtime's stores and kvtool/attention.py: the model's score scale
with its logit soft-cap (`Scaling`), and softmax attention as a partial result with its log-sum-exp (`partial`),
which the stores merge (kvtool.stores.base.merge). A low module (torch only, nothing from kvtool), so the attention module (which calibrate/ imports) can use it without importing the runtime.
"""

from __future__ import annotations

import math

import torch


class Scaling(float):
    """The attention's score scale (the model's: Gemma's `query_pre_attn_scalar**-0.5`, else head_dim**-0.5), a float
    that also carries the model's logit soft-cap (Gemma 2: scores become tanh(s / cap) · cap; None: none). Stores take
    it where they take `scaling` and cap their scores with `softcap_` before masking."""

    softcap: float | None

    def __new__(cls, value: float, softcap: float | None = None):
        obj = super().__new__(cls, value)
        obj.softcap = softcap
        return obj


def softcap_(s: torch.Tensor, scaling) -> torch.Tensor:
    """Scaled scores s (any shape, float32) soft-capped in place when `scaling` carries a cap (Scaling)."""
    cap = getattr(scaling, "softcap", None)
    if cap:
        s.div_(cap).tanh_().mul_(cap)
    return s


def partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
            allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, h·G, t, D] over k, v [B, h, n, D] (any float dtype; computed in float32) with an
    optional mask allowed [t, n] → (out [B, h·G, t, D], lse [B, h·G, t]), both float32 (scores soft-capped when
    `scaling` carries a cap). Query heads h·G .. h·G+G-1
    read KV head h (GQA)."""
    b, hq, t, d = q.shape
    h = k.shape[1]
    g = hq // h
    qf = q.float().reshape(b, h, g * t, d)                                      # [B, h, G·t, D]
    s = torch.matmul(qf, k.float().transpose(-1, -2))                          # [B, h, G·t, n]
    softcap_(s.mul_(scaling), scaling)
    if allowed is not None:
        s.masked_fill_(~allowed.repeat(g, 1), -math.inf)
    return softmax_partial(s, v.float(), b, hq, t)


def softmax_partial(s: torch.Tensor, v: torch.Tensor, b: int, hq: int, t: int):
    """Scores s [B, h, G·t, n] (masked with -inf) → (out [B, h·G, t, D], lse [B, h·G, t]), softmax over n of
    values v [B, h, n, D] float32. In place on s; a row with no visible key gets out 0, lse -inf."""
    m = s.amax(-1, keepdim=True).clamp_min_(-1e30)                             # [B, h, G·t, 1]
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)                                             # [B, h, G·t, 1]
    out = torch.matmul(p, v).div_(total.clamp_min(1e-30))                     # [B, h, G·t, D]
    lse = total.log_().add_(m)
    return out.view(b, hq, t, -1), lse.view(b, hq, t)
