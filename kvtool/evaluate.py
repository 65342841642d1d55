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
from kvtool.texts import check_text_source, text_ids
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
    sample_nll: list[float] = field(default_factory=list)   # nll: each sample's mean over its continuation tokens
    text: str | None = None                   # the text source the samples came from (kvtool.texts.TEXT_SOURCES)
    read_bytes: float | None = None           # bytes one decode step read from the cache (the last step, mean)
    query: str | None = None                  # passkey(-chat): "inside" / "after" (split_question); None: inside
    shared_prefill: bool = False              # bench --share-prefill: the prompt's prefill was shared by a group of
                                              # specs (kvtool.shared_prefill); its time is counted in full here
    reused_tokens: int = 0                    # bench --reuse-prefix: prompt tokens resumed from a saved state, not run
                                              # (kvtool.prefix_reuse); prefill tok/s counts only the tokens run

    @property
    def ratio(self) -> float:
        """How many times smaller than a 16-bit full cache."""
        return self.full16_bytes / max(self.kv_bytes, 1.0)

    def row(self) -> dict:
        out = {"cache": self.spec, "task": self.task, "samples": self.samples}
        if self.correct is not None:                          # passkey and the generation tasks of kvtool.tasks
            out["accuracy"] = f"{self.correct}/{self.samples}"
            out["hits"] = "".join("1" if h else "0" for h in self.hits)
        else:
            out["nll"] = round(self.nll, 4)
            out["sample_nll"] = [round(x, 5) for x in self.sample_nll]
        if self.text is not None:
            out["text"] = self.text
        if self.query is not None:
            out["query"] = self.query
        if self.shared_prefill:
            out["shared_prefill"] = True
        if self.reused_tokens:
            out["reused_tokens"] = self.reused_tokens
        out["kv_MiB"] = round(self.kv_bytes / 2**20, 3)
        if self.read_bytes is not None:
            out["read_MiB"] = round(self.read_bytes / 2**20, 3)
        out.update({"x_smaller_than_16bit": round(self.ratio, 2),
                    "prefill_tok_s": round(self.prefill_tokens_per_s, 1),
                    "decode_tok_s": round(self.decode_tokens_per_s, 2), "seconds": round(self.seconds, 1)})
        return out


def passkey_grid(tokenizer, lengths, depths, words: int = 5, seed: int = 0, fmt: str = "numeric",
                 text: str | None = None):
    """One single-needle passkey sample per (length, depth) as (prompt ids [T], answer text).

    fmt "numeric": the classic 5-digit pass key (kvtool.data.numeric_passkey_prompts) in the haystack `text`:
    "filler" (repeated sentences, the default), a text source name ("pydoc", "stdlib") or a .txt / .jsonl path;
    fmt "pydoc" is "numeric" with text "pydoc"; "nato": kvtool's calibration format with a key of `words` NATO words
    in `text` (default "pydoc"). The prompt ends where the answer starts.
    """
    specs = [(int(n), float(d)) for n in lengths for d in depths]
    if fmt == "pydoc" and text not in (None, "pydoc"):
        raise KvtoolError(f"passkey format pydoc reads pydoc, not {text!r}; use fmt numeric with text={text!r}")
    if fmt in ("numeric", "pydoc"):
        haystack = text if text is not None else "filler" if fmt == "numeric" else "pydoc"
        return numeric_passkey_prompts(tokenizer, specs, seed=seed, haystack=haystack)
    if fmt != "nato":
        raise KvtoolError(f"unknown passkey format {fmt!r} (numeric, pydoc or nato)")
    out = []
    for i, (length, depth) in enumerate(specs):
        s = passkey_samples(tokenizer, 1, length, n_needles=1, words_per_needle=words, depths=[depth], seed=seed + i,
                            text=text or "pydoc")[0]
        (a, b), = s.answer_spans
        out.append((s.input_ids[:a], tokenizer.decode(s.input_ids[a:b]).strip()))
    return out


def nll_samples(tokenizer, n: int, context: int, continuation: int, seed: int = 0,
                source: str = "pydoc") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` disjoint windows of natural text as (context ids [C], continuation ids [N]), cut from `source`: a text
    source name of kvtool.texts.TEXT_SOURCES ("pydoc": Python's documentation, the default; "stdlib": standard
    library docstrings) or a .txt / .jsonl path. The text is never repeated to fit: too short a text is refused."""
    need = n * (context + continuation)
    check_text_source(source, passkey=False, flag="NLL text")
    ids = text_ids(source, tokenizer, need, tile=False)
    if len(ids) < need:
        raise KvtoolError(f"the text {source} gives {len(ids)} tokens here; {n} x ({context} + {continuation}) = "
                          f"{need} do not fit; ask for fewer or shorter samples, or give a longer text")
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
        self.kv = self.full = self.read = 0.0
        self.start = time.perf_counter()

    def held(self, cache) -> None:
        self.kv += self.handle.nbytes(cache)
        self.full += self.handle.full16(cache)

    def step_read(self, cache) -> None:
        """Bytes the last forward (a decode step) read: a CompressedCache's own count (RocketKV stage 2 reads some
        pages), else everything the cache holds."""
        read = getattr(cache, "read_nbytes", None)
        self.read += read() if read is not None else self.handle.nbytes(cache)

    def result(self, spec: str, task: str, samples: int, **extra) -> TaskResult:
        n = max(samples, 1)
        return TaskResult(spec, task, samples, self.kv / n, self.full / n, self.n_pre / max(self.pre.seconds, 1e-9),
                          self.n_dec / max(self.dec.seconds, 1e-9), time.perf_counter() - self.start,
                          read_bytes=self.read / n if self.n_dec else None, **extra)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device(model):
    from kvtool.models import input_device

    return input_device(model)


QUERIES = ("inside", "after")


def split_question(tokenizer, prompt: torch.Tensor, question: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt [T] → (context, question): the question is the prompt's closing `question` ids (default: a numeric
    pass-key prompt's kvtool.data.PASSKEY_QUESTION; passkey-chat: kvtool.tasks.chat_passkey_question). For the
    "after" regime (SCBench, arXiv 2412.10319: the context is compressed first, then the question arrives, as in
    multi-turn reuse), where query-aware eviction cannot see the question."""
    from kvtool.data import PASSKEY_QUESTION
    from kvtool.texts import _encode

    if question is None:
        question = _encode(tokenizer, PASSKEY_QUESTION)
    q = torch.tensor(question, dtype=prompt.dtype)
    if len(q) >= len(prompt) or not torch.equal(prompt[-len(q):].cpu(), q):
        raise KvtoolError("--query after needs prompts that end with the task's question (numeric pass-key or "
                          "passkey-chat prompts)")
    return prompt[:-len(q)], prompt[-len(q):]


def prompt_in(model, tokenizer, prompt, cache, chunk: int, query: str, dev, question: list[int] | None = None,
              reuse=None, index: int = 0):
    """Prefill a prompt under a query regime: "inside", the whole prompt at once (selection sees the question);
    "after", the context (the cache compresses it: kvtool's prefill ends with finish_prefill), then the question
    (`question`: its ids, see split_question). `reuse` (kvtool.prefix_reuse.PrefixReuse, planned on what this
    regime prefills first: `prefilled_part`) resumes sample `index` from a saved state.
    → (the last position's logits [1, V], the cache holding the prompt: `cache`, or a copy replacing it)."""
    first, rest = prefilled_part(tokenizer, prompt, query, question)
    if reuse is None:
        logits = prefill(model, first.view(1, -1).to(dev), cache, chunk)
    else:
        logits, cache = reuse.prefill(model, index, first.view(1, -1).to(dev), cache)
    if rest is not None:
        logits = prefill(model, rest.view(1, -1).to(dev), cache, chunk)
    return logits, cache


def prefilled_part(tokenizer, prompt, query: str, question: list[int] | None = None):
    """(what a regime prefills and compresses first [T'], what it runs after that or None): "inside", the whole
    prompt; "after", split_question's (context, question)."""
    if query == "inside":
        return prompt, None
    return split_question(tokenizer, prompt, question)


def reuse_plan(tokenizer, prompts, query: str, chunk: int, question: list[int] | None = None, reuse: bool = True):
    """A kvtool.prefix_reuse.PrefixReuse over what `query` prefills first of each prompt, or None without `reuse`."""
    if not reuse:
        return None
    from kvtool.prefix_reuse import PrefixReuse

    return PrefixReuse([prefilled_part(tokenizer, p, query, question)[0] for p in prompts], chunk)


def greedy(model, cache, logits, steps: int, m: "Meter") -> list[int]:
    """`steps` greedy tokens after a prefill whose last logits are `logits` [1, V]; every step but the last is a
    timed single-token decode through `cache` (the last token needs no forward)."""
    got = []
    for i in range(steps):
        token = logits.argmax(-1)                                                    # [1]
        got.append(int(token))
        if i + 1 == steps:
            break
        with m.dec:
            logits = model(input_ids=token.view(1, 1), **with_cache(model, cache), use_cache=True).logits[:, -1]
        m.n_dec += 1
    return got


def passkey_steps(tokenizer, answer: str) -> int:
    """Greedy tokens a passkey answer gets: its tokens + 4."""
    return len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + 4


def nll_tail(model, cache, last, cont, decode_steps: int, m: "Meter") -> float:
    """After a context's prefill (last logits [1, V]): teacher-force the continuation cont [N] through the cache, then
    `decode_steps` timed greedy steps; the summed cross-entropy of the N continuation tokens."""
    logits = model(input_ids=cont[:-1].view(1, -1), **with_cache(model, cache), use_cache=True).logits[0]
    logits = torch.cat([last, logits], 0).float()                                       # [N, V]
    one = float(torch.nn.functional.cross_entropy(logits, cont, reduction="sum"))
    m.held(cache)
    token = logits[-1].argmax().view(1, 1)
    for _ in range(decode_steps):
        with m.dec:
            token = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        m.n_dec += 1
    m.step_read(cache)
    return one


@torch.inference_mode()
def run_passkey(model, tokenizer, samples, spec: str, profile=None, chunk: int = 512, backend: str = "auto",
                query: str = "inside", reuse: bool = False) -> TaskResult:
    """Greedy-decode after a chunked prefill; correct when the key appears in the first len(key)+4 generated tokens.
    `query`: "inside" (the question is part of the prompt) or "after" (asked after the context was compressed).
    `reuse`: resume each prefill from a saved state of an earlier sample's same start (kvtool.prefix_reuse; the same
    results, fewer prefill tokens run)."""
    from kvtool.baselines import make_cache

    if query not in QUERIES:
        raise KvtoolError(f"unknown query regime {query!r} (inside or after)")
    m = Meter(make_cache(model, profile, spec, backend))
    dev = _device(model)
    plan = reuse_plan(tokenizer, [s[0] for s in samples], query, chunk, reuse=reuse)
    hits = []
    for i, (prompt, answer) in enumerate(samples):
        cache = m.handle.fresh()
        with m.pre:
            logits, cache = prompt_in(model, tokenizer, prompt, cache, chunk, query, dev, reuse=plan, index=i)
        m.n_pre += prompt.numel() - (plan.last_reused if plan else 0)
        got = greedy(model, cache, logits, passkey_steps(tokenizer, answer), m)
        hits.append(answer in tokenizer.decode(got))
        m.held(cache)
        m.step_read(cache)
    return m.result(spec, "passkey", len(samples), correct=sum(hits), hits=hits,
                    query=None if query == "inside" else query, reused_tokens=plan.reused_tokens if plan else 0)


@torch.inference_mode()
def run_nll(model, samples, spec: str, profile=None, chunk: int = 512, decode_steps: int = 16,
            backend: str = "auto") -> TaskResult:
    """Compress each context (chunked prefill), then teacher-force the continuation in one forward through the cache;
    NLL = mean cross-entropy of every continuation token (the first predicted from the context's last position).
    Bytes are read after the context and the continuation are in the cache. Decode speed: `decode_steps` greedy
    single-token steps after that."""
    from kvtool.baselines import make_cache

    total_nll, total_tok, per = 0.0, 0, []
    m = Meter(make_cache(model, profile, spec, backend))
    dev = _device(model)
    for context, cont in samples:
        cache = m.handle.fresh()
        with m.pre:
            last = prefill(model, context.view(1, -1).to(dev), cache, chunk)          # [1, V]
        m.n_pre += context.numel()
        cont = cont.to(dev)
        one = nll_tail(model, cache, last, cont, decode_steps, m)
        total_nll += one
        per.append(one / max(cont.numel(), 1))
        total_tok += cont.numel()
    return m.result(spec, "nll", len(samples), nll=total_nll / max(total_tok, 1), sample_nll=per)


def default_depths(n: int) -> np.ndarray:
    return np.linspace(0.1, 0.9, n)


def paired_bootstrap(row: dict, full: dict, n: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of a row's difference from the full cache's row on the same samples
    (resampled together): passkey, the change in correct samples (a count out of the row's samples); nll, the change
    in NLL in percent of the full cache's. None when the rows do not hold per-sample results of equal length."""
    if "hits" in row and "hits" in full and len(row["hits"]) == len(full["hits"]) and row["hits"]:
        a = np.array([c == "1" for c in row["hits"]], dtype=float)
        b = np.array([c == "1" for c in full["hits"]], dtype=float)
        stat = lambda i: a[i].mean() - b[i].mean()                                   # noqa: E731
        scale = len(a)
    elif row.get("sample_nll") and full.get("sample_nll") and len(row["sample_nll"]) == len(full["sample_nll"]):
        a, b = np.array(row["sample_nll"]), np.array(full["sample_nll"])
        stat = lambda i: a[i].mean() / b[i].mean() - 1                               # noqa: E731
        scale = 100.0
    else:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    vals = np.array([stat(i) for i in idx]) * scale
    vals = np.round(vals, 9)                                                         # counts stay whole numbers
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
