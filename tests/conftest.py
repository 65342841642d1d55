"""Shared fixtures: tiny random models built in-process (no downloads), and planted needle samples."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 128


def tiny_model(kind: str = "gqa", seed: int = 0, layers: int = 3):
    """Tiny random causal LMs: Llama GQA / MHA / MQA, and Qwen3 with sliding-window layers and k_norm."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  max_position_embeddings=512, num_attention_heads=4)
    if kind == "sliding":
        types = ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)]
        cfg = Qwen3Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=24, use_sliding_window=True,
                          layer_types=types)
        model = Qwen3ForCausalLM(cfg)
    else:
        kv = {"gqa": 2, "mha": 4, "mqa": 1}[kind]
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=kv))
    # Larger-than-default weights give peaked, varied attention (more informative than near-uniform rows).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    return model.eval()


def identical_keys_model(seed: int = 0, layers: int = 3, same_queries: bool = False):
    """A tiny GQA model whose layers 0 and 1 have identical keys: layer 0 adds nothing to the residual stream (o_proj
    and the MLP's down_proj are 0) and layer 1 copies its input norm and k_proj (and q_proj with `same_queries`, so
    the attention rows match too); values differ, and layer 1's output matters."""
    model = tiny_model("gqa", seed=seed, layers=layers)
    a, b = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        a.self_attn.o_proj.weight.zero_()
        a.mlp.down_proj.weight.zero_()
        b.input_layernorm.weight.copy_(a.input_layernorm.weight)
        b.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight)
        if same_queries:
            b.self_attn.q_proj.weight.copy_(a.self_attn.q_proj.weight)
    return model


def needle_sample(T: int = 120, seed: int = 0, needle_at: int = 40, n: int = 8):
    """Random tokens with a planted copy: tokens [needle_at, needle_at+n) repeated at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (T,), generator=g)
    start = T - n - 2
    ids[start:start + n] = ids[needle_at:needle_at + n]
    pairs = torch.stack([torch.arange(start, start + n), torch.arange(needle_at, needle_at + n)], 1)
    return SimpleNamespace(input_ids=ids, copy_pairs=pairs, needle_spans=[(needle_at, needle_at + n)],
                           answer_spans=[(start, start + n)], meta={"kind": "test"})


@pytest.fixture(params=["gqa", "mha", "mqa", "sliding"])
def any_tiny_model(request):
    return request.param, tiny_model(request.param)


def cli_exit_code(*args) -> int:
    """Run the console entry point in-process with `kvtool *args`; its exit code (read the output with capsys)."""
    from kvtool.cli import main

    argv, sys.argv = sys.argv, ["kvtool", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    finally:
        sys.argv = argv
    return 0
