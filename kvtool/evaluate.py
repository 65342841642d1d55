"""Side-by-side evaluation: passkey exact match under a cache policy, with the KV bytes the cache really held."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from kvtool.cache import CompressedCache, prefill, use_kvtool_attention
from kvtool.data import numeric_passkey_prompts, passkey_samples
from kvtool.errors import KvtoolError


@dataclass
class PasskeyResult:
    policy: str
    correct: int
    total: int
    kv_bytes: int            # bytes held after prefill + answer, summed over samples
    full_bytes: int          # a full cache in the model dtype for the same tokens, summed over samples
    seconds: float

    @property
    def ratio(self) -> float:
        return self.full_bytes / max(self.kv_bytes, 1)


def passkey_grid(tokenizer, lengths, depths, words: int = 5, seed: int = 0, fmt: str = "numeric"):
    """One single-needle passkey sample per (length, depth) as (prompt ids [T], answer text).

    fmt "numeric": the classic pass-key prompt (kvtool.data.numeric_passkey_prompts); "nato": kvtool's calibration
    format with a key of `words` NATO words. The prompt ends where the answer starts.
    """
    specs = [(int(n), float(d)) for n in lengths for d in depths]
    if fmt == "numeric":
        return numeric_passkey_prompts(tokenizer, specs, seed=seed)
    if fmt != "nato":
        raise KvtoolError(f"unknown passkey format {fmt!r} (numeric or nato)")
    out = []
    for i, (length, depth) in enumerate(specs):
        s = passkey_samples(tokenizer, 1, length, n_needles=1, words_per_needle=words, depths=[depth], seed=seed + i)[0]
        (a, b), = s.answer_spans
        out.append((s.input_ids[:a], tokenizer.decode(s.input_ids[a:b]).strip()))
    return out


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, samples, policy: str, profile=None, chunk: int = 512) -> PasskeyResult:
    """Greedy-decode after a chunked prefill; correct when the answer text appears in the first len(answer)+4 tokens
    generated (passkey evaluations check that the key is in the output)."""
    previous = model.config._attn_implementation
    use_kvtool_attention(model)
    correct = kv = full = 0
    start = time.perf_counter()
    cache = CompressedCache(model, profile, policy)          # checks the profile against the model once
    try:
        for prompt, answer in samples:
            cache.reset()
            logits = prefill(model, prompt.view(1, -1), cache, chunk=chunk)
            got = []
            for _ in range(len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + 4):
                token = logits.argmax(-1)                                       # [1]
                got.append(int(token))
                logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
            correct += int(answer in tokenizer.decode(got))
            kv += cache.nbytes()
            full += cache.full_nbytes(next(model.parameters()).dtype)
    finally:
        model.set_attn_implementation(previous)
    return PasskeyResult(policy, correct, len(samples), kv, full, time.perf_counter() - start)


def default_depths(n: int) -> np.ndarray:
    return np.linspace(0.1, 0.9, n)
