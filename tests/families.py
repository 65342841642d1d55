"""Tiny random-init models of every architecture family kvtool supports (tests/test_architectures.py), built
in-process from their transformers configs: 2 layers (3 where layers alternate), hidden 64, a vocabulary of 128."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=512)
ALTERNATE = ["sliding_attention", "full_attention", "sliding_attention"]

# family -> (config class, model class, config keywords)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",                          # GQA
              dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM",                    # every layer sliding (window 24)
                dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",                          # q/k/v biases
              dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",                          # q/k norm
              dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "qwen3-sliding": ("Qwen3Config", "Qwen3ForCausalLM",                  # q/k norm, alternating sliding layers
                      dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           use_sliding_window=True, sliding_window=24, layer_types=ALTERNATE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",                       # soft-capping, query_pre_attn_scalar
               dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=24, layer_types=ALTERNATE, query_pre_attn_scalar=24,
                    attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",                   # q/k norm, MQA, head_dim 32 != 64/4
               dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                    sliding_window=24, layer_types=ALTERNATE, query_pre_attn_scalar=24)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",                             # fused qkv_proj
             dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",                             # MHA, learned positions, no RoPE
             dict(n_layer=2, n_head=4, n_embd=64, n_positions=512, vocab_size=VOCAB,
                  bos_token_id=1, eos_token_id=2)),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",                      # attention sinks (s_aux), MoE
                dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_local_experts=2, num_experts_per_tok=1, sliding_window=24,
                     layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
ROPE = {name for name in FAMILIES if name != "gpt2"}
TRACED = [name for name in FAMILIES if name != "gpt-oss"]                 # the tracer refuses attention sinks


def family_model(name: str, seed: int = 0, vocab: int = VOCAB, context: int = 512, **overrides):
    """The family's tiny model in eval mode; q/k weights scaled up for peaked, varied attention (as conftest's).
    `vocab` / `context`: a tokenizer's vocabulary and a longer context (for the calibration methods' data);
    `overrides`: config keywords that replace the family's (tests/test_gguf_families.py: what a GGUF cannot carry)."""
    cfg_cls, model_cls, kw = FAMILIES[name]
    torch.manual_seed(seed)
    if name == "gpt2":
        kw = {**kw, "vocab_size": vocab, "n_positions": context}
    else:
        kw = {**COMMON, **kw, "vocab_size": vocab, "max_position_embeddings": context}
    kw = {**kw, **overrides}
    cfg = getattr(tf, cfg_cls)(**kw)
    if name == "gemma3":                                                  # sliding layers: their own RoPE base
        cfg.rope_parameters["sliding_attention"]["rope_theta"] = 10_000.0
    model = getattr(tf, model_cls)(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".sinks"):                                  # sink logits large enough to matter
                p.normal_(0.0, 2.0)
            if pname.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "c_attn.weight")):
                p.mul_(6.0 if name != "gpt2" else 3.0)
    return model.eval()
