"""Write a tiny model of a family (tests/families.py) as a `.gguf` file, in-process, with the `gguf` package's writer.

The tensor names come from gguf's own HF -> GGUF name map (the map transformers inverts when it reads a GGUF), and
each tensor is stored as llama.cpp's converter stores it, so that transformers' reader (modeling_gguf_pytorch_utils)
undoes it: Llama/Mistral q/k rows permuted, Gemma norms stored as 1 + w, GPT-2's Conv1D weights transposed. The
metadata is what transformers.integrations.ggml maps back to the config; the tokenizer is the embedded GGUF's (a
`gpt2` BPE vocabulary) cut to its first VOCAB tokens (every byte-level character and the merges among them: a smaller
but complete BPE, so the models stay tiny and the conversion fast), copied field by field. Tensors are float32.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from kvtool.models import embedded_gguf_path

# family -> GGUF architecture name (Mistral is stored as `llama`, recognised by "mistral" in general.name)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "gemma2": "gemma2", "gemma3": "gemma3", "gpt2": "gpt2"}
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                   "tokenizer.ggml.add_bos_token")
VOCAB = 8192
_tokenizer_fields: dict | None = None


def tokenizer_fields() -> dict:
    """key -> (value, GGUF value type, array item type) of the embedded GGUF's tokenizer (read once)."""
    global _tokenizer_fields
    if _tokenizer_fields is None:
        reader = gguf.GGUFReader(embedded_gguf_path())
        _tokenizer_fields = {}
        for key in _TOKENIZER_KEYS:
            field = reader.fields[key]
            sub = field.types[1] if len(field.types) > 1 else None
            _tokenizer_fields[key] = [field.contents(), field.types[0], sub]
        tokens = _tokenizer_fields["tokenizer.ggml.tokens"][0][:VOCAB]
        kept = set(tokens)
        merges = [m for m in _tokenizer_fields["tokenizer.ggml.merges"][0]
                  if (pair := m.split(" "))[0] in kept and pair[1] in kept and "".join(pair) in kept]
        _tokenizer_fields["tokenizer.ggml.tokens"][0] = tokens
        _tokenizer_fields["tokenizer.ggml.token_type"][0] = _tokenizer_fields["tokenizer.ggml.token_type"][0][:VOCAB]
        _tokenizer_fields["tokenizer.ggml.merges"][0] = merges
    return _tokenizer_fields


def vocab_size() -> int:
    return len(tokenizer_fields()["tokenizer.ggml.tokens"][0])


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (pairs interleaved per head); transformers' LlamaTensorProcessor reverses it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(name: str, model, path: Path) -> Path:
    """Write `model` (family `name`, vocabulary = vocab_size()) to `path` as a float32 GGUF."""
    arch = ARCH[name]
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("mistral" if name == "mistral" else f"tiny-{name}")   # the reader matches "mistral" exactly
    layers = cfg.num_hidden_layers
    writer.add_block_count(layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if name == "gpt2":
        writer.add_feed_forward_length(4 * cfg.hidden_size)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
    if name in ("gemma2", "gemma3"):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    for key, (value, vtype, sub) in tokenizer_fields().items():
        writer.add_key_value(key, value, vtype, sub_type=sub)

    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue                                                    # no output.weight: the reader ties
        base, suffix = hf_name.rsplit(".", 1)
        gname = names.get_name(base)
        assert gname is not None, hf_name
        w = tensor.detach().float().numpy().copy()
        if arch == "llama" and gname.endswith(("attn_q", "attn_k")) and suffix == "weight":
            w = _permute(w, cfg.num_attention_heads if gname.endswith("attn_q") else cfg.num_key_value_heads)
        if arch in ("gemma2", "gemma3") and gname.endswith("norm") and suffix == "weight":
            w = w + 1.0                                                 # the reader subtracts 1
        if arch == "gpt2" and gname.endswith(("attn_qkv", "ffn_down", "ffn_up", "attn_output")) and suffix == "weight":
            w = w.T.copy()                                              # Conv1D [in, out] -> GGUF [out, in]
        writer.add_tensor(f"{gname}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
