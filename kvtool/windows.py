"""Which keys a query may see, by absolute positions: the rules shared by the runtime's stores and by calibration
(DuoAttention's training mask). A low module: it imports nothing from the runtime or from calibrate/."""

from __future__ import annotations

import torch


def causal_allowed(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """bool [n_q, n_k]: a query sees every key at or before it."""
    return kpos.view(1, -1) <= qpos.view(-1, 1)


def window_allowed(qpos: torch.Tensor, kpos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """The streaming pattern (StreamingLLM arXiv 2309.17453), bool [n_q, n_k]: a query sees a key at or before it
    that is one of the first `sink` tokens or one of its last `recent` tokens."""
    q, k = qpos.view(-1, 1), kpos.view(1, -1)
    return (k <= q) & ((k < sink) | (q - k < recent))


def sliding_allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int) -> torch.Tensor:
    """A model's own sliding-window layer (Mistral / Gemma / Qwen3 `sliding_attention`), bool [n_q, n_k]: a query
    sees the keys at most `window - 1` positions before it (transformers' sliding_window_overlay)."""
    q, k = qpos.view(-1, 1), kpos.view(1, -1)
    return (k <= q) & (q - k < window)


def layer_types(config) -> list[str]:
    """A text config's layer types: its `layer_types` ("full_attention", "sliding_attention", ...), else every layer
    "sliding_attention" when it sets a sliding window without naming layer types (Mistral, Phi-3: their masks slide
    on every layer), else every layer "full_attention"."""
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        types = [kind] * config.num_hidden_layers
    return types
