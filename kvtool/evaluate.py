"""Side-by-side evaluation: passkey exact match under a cache policy, with the KV bytes the cache really held."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from kvtool.cache import CompressedCache, prefill, use_kvtool_attention
from kvtool.data import haystack_text, passkey_samples
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

    fmt "numeric": the classic pass-key prompt (a 5-digit key stated twice in the haystack, "What is the pass key?");
    fmt "nato": kvtool's calibration format (a key of `words` NATO words). The prompt ends where the answer starts.
    """
    out = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            s_seed = seed + 1000 * i + j
            if fmt == "nato":
                s = passkey_samples(tokenizer, 1, int(length), n_needles=1, words_per_needle=words,
                                    depths=[float(depth)], seed=s_seed)[0]
                (a, b), = s.answer_spans
                out.append((s.input_ids[:a], tokenizer.decode(s.input_ids[a:b]).strip()))
            elif fmt == "numeric":
                out.append(_numeric(tokenizer, int(length), float(depth), s_seed))
            else:
                raise KvtoolError(f"unknown passkey format {fmt!r} (numeric or nato)")
    return out


def _numeric(tokenizer, length: int, depth: float, seed: int):
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    intro = enc("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n")
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc("\n\nWhat is the pass key? The pass key is")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    n = length - len(bos) - len(intro) - len(needle) - len(question)
    if n < 1:
        raise KvtoolError(f"passkey length {length} is too short for the prompt")
    hay = _haystack_ids(tokenizer)
    start = int(rng.integers(0, len(hay) - n))
    h, cut = hay[start:start + n], int(depth * n)
    ids = bos + intro + h[:cut] + needle + h[cut:] + question
    return torch.tensor(ids, dtype=torch.long), key


_HAY: dict = {}


def _haystack_ids(tokenizer) -> list[int]:
    key = id(tokenizer)
    if key not in _HAY:
        _HAY[key] = tokenizer(haystack_text()[:600_000], add_special_tokens=False)["input_ids"]
    return _HAY[key]


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, samples, policy: str, profile=None, chunk: int = 512) -> PasskeyResult:
    """Greedy-decode after a chunked prefill; correct when the answer text appears in the first len(answer)+4 tokens
    generated (passkey evaluations check that the key is in the output)."""
    previous = model.config._attn_implementation
    use_kvtool_attention(model)
    correct = kv = full = 0
    start = time.perf_counter()
    try:
        for prompt, answer in samples:
            cache = CompressedCache(model, profile, policy)
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
