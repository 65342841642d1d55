"""Side-by-side evaluation: passkey exact match under a cache policy, with the KV bytes the cache really held."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from kvtool.cache import CompressedCache, prefill, use_kvtool_attention
from kvtool.data import passkey_samples


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


def passkey_grid(tokenizer, lengths, depths, words: int = 5, seed: int = 0):
    """One single-needle passkey sample per (length, depth): the prompt ends right before the answer's words."""
    out = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            s = passkey_samples(tokenizer, 1, int(length), n_needles=1, words_per_needle=words, depths=[float(depth)],
                                seed=seed + 1000 * i + j)[0]
            (a, b), = s.answer_spans
            out.append((s.input_ids[:a], s.input_ids[a:b]))                      # (prompt [T], answer [n])
    return out


@torch.inference_mode()
def passkey_accuracy(model, samples, policy: str, profile=None, chunk: int = 512) -> PasskeyResult:
    """Greedy-decode each answer after a chunked prefill; exact match of every answer token."""
    use_kvtool_attention(model)
    correct = kv = full = 0
    start = time.perf_counter()
    try:
        for prompt, answer in samples:
            cache = CompressedCache(model, profile, policy)
            logits = prefill(model, prompt.view(1, -1), cache, chunk=chunk)
            got = []
            for _ in range(answer.numel()):
                token = logits.argmax(-1)                                       # [1]
                got.append(int(token))
                logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
            correct += int(got == answer.tolist())
            kv += cache.nbytes()
            full += cache.full_nbytes(next(model.parameters()).dtype)
    finally:
        model.set_attn_implementation("sdpa")
    return PasskeyResult(policy, correct, len(samples), kv, full, time.perf_counter() - start)


def default_depths(n: int) -> np.ndarray:
    return np.linspace(0.1, 0.9, n)
