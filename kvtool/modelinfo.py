"""What kvtool reads off a loaded model's architecture, shared by the trace, the runtime and calibration (a low module:
torch and kvtool.errors only): the attention's sizes (`Dims`), its attention modules, whether it rotates keys
(`has_rope`) and where its pre-RoPE keys come out (`key_source`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.errors import KvtoolError


@dataclass(frozen=True)
class Dims:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @classmethod
    def of(cls, model) -> "Dims":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        h = cfg.num_attention_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return cls(cfg.num_hidden_layers, h, getattr(cfg, "num_key_value_heads", None) or h, d)


def attention_modules(model) -> list:
    """The self-attention modules (one per layer, with a `layer_idx`): Llama-style (k_proj / v_proj), fused qkv_proj
    (Phi-3) or GPT-2's c_attn."""
    mods = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None
            and not getattr(m, "is_cross_attention", False)
            and ((hasattr(m, "k_proj") and hasattr(m, "v_proj")) or hasattr(m, "qkv_proj") or hasattr(m, "c_attn"))]
    if not mods:
        raise KvtoolError(
            f"the tracer does not understand {type(model).__name__}: no attention modules with k_proj/v_proj, "
            "qkv_proj or c_attn and a layer_idx"
        )
    return mods


def has_rope(model) -> bool:
    """Whether the model rotates keys by position (a rotary embedding on the decoder); GPT-2 does not."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return any(hasattr(m, "rotary_emb") for m in (model, getattr(model, "model", None), decoder) if m is not None)


def key_source(model, module) -> tuple[torch.nn.Module, str] | None:
    """Where `module`'s pre-RoPE keys come out: (submodule, how) with how "norm" (a key norm), "proj" (k_proj), or
    "fused" (the key slice of qkv_proj); None for a model without RoPE (its keys are taken in the attention call)."""
    if not has_rope(model):
        return None
    if getattr(module, "k_norm", None) is not None:
        return module.k_norm, "norm"
    if hasattr(module, "k_proj"):
        return module.k_proj, "proj"
    if hasattr(module, "qkv_proj"):
        return module.qkv_proj, "fused"
    raise KvtoolError(f"the tracer cannot find the pre-RoPE keys of {type(module).__name__} "
                      "(no k_norm, k_proj or qkv_proj)")
