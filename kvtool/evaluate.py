"""Side-by-side evaluation on the same inputs: passkey exact match and continuation NLL under a cache, with the KV
bytes the cache really held and prefill / decode speed.

A cache is named by a *spec*: `full` (transformers' DynamicCache: the uncompressed reference), a kvtool policy
string (`heads=duo:0.5,k=4,v=4`; a CompressedCache), or a baseline from kvtool.baselines (`quanto:4`,
`streaming:4:1020`, `press:<name>:<ratio>`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtool.cache import prefill, with_cache
from kvtool.data import numeric_passkey_prompts, passkey_samples
from kvtool.errors import KvtoolError


@dataclass
class TaskResult:
    """One cache spec on one task. Bytes are per sample, averaged; `full16_bytes` is a 16-bit full cache of the same
    tokens (the reference every ratio uses)."""
    spec: str
    task: str
    samples: int
    kv_bytes: float
    full16_bytes: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    seconds: float
    correct: int | None = None                # passkey
    nll: float | None = None                  # nll: mean over every continuation token of every sample
    hits: list[bool] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """How many times smaller than a 16-bit full cache."""
        return self.full16_bytes / max(self.kv_bytes, 1.0)

    def row(self) -> dict:
        out = {"cache": self.spec, "task": self.task, "samples": self.samples}
        if self.task == "passkey":
            out["accuracy"] = f"{self.correct}/{self.samples}"
        else:
            out["nll"] = round(self.nll, 4)
        out.update({"kv_MiB": round(self.kv_bytes / 2**20, 3), "x_smaller_than_16bit": round(self.ratio, 2),
                    "prefill_tok_s": round(self.prefill_tokens_per_s, 1),
                    "decode_tok_s": round(self.decode_tokens_per_s, 2), "seconds": round(self.seconds, 1)})
        return out


def passkey_grid(tokenizer, lengths, depths, words: int = 5, seed: int = 0, fmt: str = "numeric"):
    """One single-needle passkey sample per (length, depth) as (prompt ids [T], answer text).

    fmt "numeric": the classic 5-digit pass key in repeated filler text (kvtool.data.numeric_passkey_prompts);
    "pydoc": the same key in a window of Python's documentation; "nato": kvtool's calibration format with a key of
    `words` NATO words. The prompt ends where the answer starts.
    """
    specs = [(int(n), float(d)) for n in lengths for d in depths]
    if fmt in ("numeric", "pydoc"):
        return numeric_passkey_prompts(tokenizer, specs, seed=seed, haystack="filler" if fmt == "numeric" else "pydoc")
    if fmt != "nato":
        raise KvtoolError(f"unknown passkey format {fmt!r} (numeric, pydoc or nato)")
    out = []
    for i, (length, depth) in enumerate(specs):
        s = passkey_samples(tokenizer, 1, length, n_needles=1, words_per_needle=words, depths=[depth], seed=seed + i)[0]
        (a, b), = s.answer_spans
        out.append((s.input_ids[:a], tokenizer.decode(s.input_ids[a:b]).strip()))
    return out


def nll_samples(tokenizer, n: int, context: int, continuation: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` disjoint windows of natural text (Python's documentation, kvtool.data's haystack) as (context ids [C],
    continuation ids [N])."""
    from kvtool.data import _haystack_ids

    need = n * (context + continuation)
    ids = _haystack_ids(tokenizer, need)
    if len(ids) < need:
        raise KvtoolError(f"the built-in text has {len(ids)} tokens; {n} x ({context} + {continuation}) do not fit")
    rng = np.random.default_rng(seed)
    stride = len(ids) // n
    out = []
    for i in range(n):
        start = i * stride + int(rng.integers(0, max(1, stride - context - continuation)))
        w = torch.tensor(ids[start:start + context + continuation], dtype=torch.int64)
        out.append((w[:context], w[context:]))
    return out


class Timer:
    """Wall time of a block, synchronising CUDA before reading the clock."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        _sync()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()
        self.seconds += time.perf_counter() - self._t


class Meter:
    """What both tasks measure per cache: prefill and decode time and token counts, bytes held vs a 16-bit full
    cache (summed over samples, reported as means)."""

    def __init__(self, handle):
        self.handle, self.pre, self.dec = handle, Timer(), Timer()
        self.n_pre = self.n_dec = 0
        self.kv = self.full = 0.0
        self.start = time.perf_counter()

    def held(self, cache) -> None:
        self.kv += self.handle.nbytes(cache)
        self.full += self.handle.full16(cache)

    def result(self, spec: str, task: str, samples: int, **extra) -> TaskResult:
        n = max(samples, 1)
        return TaskResult(spec, task, samples, self.kv / n, self.full / n, self.n_pre / max(self.pre.seconds, 1e-9),
                          self.n_dec / max(self.dec.seconds, 1e-9), time.perf_counter() - self.start, **extra)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device(model):
    from kvtool.models import input_device

    return input_device(model)


@torch.inference_mode()
def run_passkey(model, tokenizer, samples, spec: str, profile=None, chunk: int = 512, backend: str = "auto") -> TaskResult:
    """Greedy-decode after a chunked prefill; correct when the key appears in the first len(key)+4 generated tokens."""
    from kvtool.baselines import make_cache

    m = Meter(make_cache(model, profile, spec, backend))
    dev = _device(model)
    hits = []
    for prompt, answer in samples:
        cache = m.handle.fresh()
        with m.pre:
            logits = prefill(model, prompt.view(1, -1).to(dev), cache, chunk)
        m.n_pre += prompt.numel()
        got = []
        steps = len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + 4
        for i in range(steps):
            token = logits.argmax(-1)                                            # [1]
            got.append(int(token))
            if i + 1 == steps:
                break
            with m.dec:
                logits = model(input_ids=token.view(1, 1), **with_cache(model, cache), use_cache=True).logits[:, -1]
            m.n_dec += 1
        hits.append(answer in tokenizer.decode(got))
        m.held(cache)
    return m.result(spec, "passkey", len(samples), correct=sum(hits), hits=hits)


@torch.inference_mode()
def run_nll(model, samples, spec: str, profile=None, chunk: int = 512, decode_steps: int = 16,
            backend: str = "auto") -> TaskResult:
    """Compress each context (chunked prefill), then teacher-force the continuation in one forward through the cache;
    NLL = mean cross-entropy of every continuation token (the first predicted from the context's last position).
    Bytes are read after the context and the continuation are in the cache. Decode speed: `decode_steps` greedy
    single-token steps after that."""
    from kvtool.baselines import make_cache

    total_nll, total_tok = 0.0, 0
    m = Meter(make_cache(model, profile, spec, backend))
    dev = _device(model)
    for context, cont in samples:
        cache = m.handle.fresh()
        with m.pre:
            last = prefill(model, context.view(1, -1).to(dev), cache, chunk)          # [1, V]
        m.n_pre += context.numel()
        cont = cont.to(dev)
        logits = model(input_ids=cont[:-1].view(1, -1), **with_cache(model, cache), use_cache=True).logits[0]
        logits = torch.cat([last, logits], 0).float()                                       # [N, V]
        total_nll += float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum"))
        total_tok += cont.numel()
        m.held(cache)
        token = logits[-1].argmax().view(1, 1)
        for _ in range(decode_steps):
            with m.dec:
                token = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            m.n_dec += 1
    return m.result(spec, "nll", len(samples), nll=total_nll / max(total_tok, 1))


def default_depths(n: int) -> np.ndarray:
    return np.linspace(0.1, 0.9, n)
