"""Calibration data for KV-cache profiling: synthetic passkey samples and user text files.

The passkey layout follows DuoAttention (Xiao et al., arXiv 2410.10819): a long haystack holding several
"The first passkey is: ..." needles, followed by questions whose answers repeat the passkey words. Answer
tokens copy needle tokens exactly, which gives the (answer_pos, source_pos) copy pairs used to score
retrieval heads as in the Retrieval Head paper (Wu et al., arXiv 2404.15574). The haystack is the Python
standard library's own documentation (`pydoc_data.topics`), so nothing is downloaded.

The evaluation tasks (`kvtool run --task`, `kvtool bench`, `--text`) read a text source of kvtool.texts: `pydoc` (that
same documentation) or `stdlib` (standard-library docstrings, held out from tuning), or a .txt / .jsonl file.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from kvtool.errors import KvtoolError
from kvtool.texts import FILLER_NAME, _bos, _encode, _read_text, check_text_source, haystack_text, text_ids

NATO_WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu",
)
INTRO = "There are important passkeys hidden in the text below. Remember them.\n\n"
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_DEPTH_GRID = np.linspace(0.05, 0.95, 1000)
_HAYSTACK_SOURCE = "pydoc_data.topics"


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64
    copy_pairs: torch.Tensor  # [N, 2] int64, rows (answer_pos, source_pos); [0, 2] for plain text
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each needle's words
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each answer's words
    meta: dict = field(default_factory=dict)  # json-serialisable provenance


@dataclass
class _Plan:
    """One passkey sample before assembly: token pieces and the haystack budget."""
    seq_len: int
    depths: list[float]
    words: list[list[str]]
    pieces: list[tuple[list[int], list[int], list[int]]]  # per needle: (prefix, key, suffix) ids
    answers: list[tuple[list[int], list[int]]]  # per needle: (question prefix, final ".") ids
    fixed: int  # tokens that are not haystack
    u: float  # uniform draw that picks the haystack window

    @property
    def hay_len(self) -> int:
        return self.seq_len - self.fixed


def ordinal(n: int) -> str:
    """1 -> "first", ..., 10 -> "tenth", 11 -> "11th", 22 -> "22nd"."""
    if n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _check_positive(name: str, value, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise KvtoolError(f"{name} must be a whole number of at least 1 (got {value!r}); {fix}")


MAX_SAMPLES = 1_000_000     # per run: samples stream one at a time, but the profile records each one's length


def _check_samples(n_samples) -> None:
    if isinstance(n_samples, (int, np.integer)) and not isinstance(n_samples, bool) and n_samples < 1:
        raise KvtoolError(f"zero samples: n_samples must be at least 1 (got {n_samples}); ask for 1 or more samples")
    _check_positive("n_samples", n_samples, "ask for 1 or more samples")
    if n_samples > MAX_SAMPLES:
        raise KvtoolError(f"{n_samples} samples is more than one run takes (at most {MAX_SAMPLES}); trace shards of "
                          "the data and combine them with `kvtool merge`")


class SampleStream(abc.Sequence):
    """`n` samples made one at a time when read (iteration or `[i]`), so memory holds one sample, not all of them.

    `seq_lens` cycles over the samples (sample i has `seq_lens[i % len(seq_lens)]` tokens); `length(i)` reads it
    without building the sample."""

    def __init__(self, n: int, make: Callable[[int], "Sample"], seq_lens: Sequence[int]):
        self.n, self.make, self.seq_lens = int(n), make, tuple(int(x) for x in seq_lens)

    def __len__(self) -> int:
        return self.n

    def length(self, i: int) -> int:
        return self.seq_lens[i % len(self.seq_lens)]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        j = i + self.n if i < 0 else i
        if not 0 <= j < self.n:
            raise IndexError(f"sample {i} of {self.n}")
        return self.make(j)

    def __iter__(self) -> Iterator["Sample"]:
        for i in range(self.n):
            yield self.make(i)


def _lengths(seq_len: int | Sequence[int]) -> list[int]:
    """The cycle of sample lengths (sample i has lens[i % len(lens)] tokens)."""
    lens = [seq_len] if isinstance(seq_len, (int, np.integer)) else list(seq_len)
    if not lens:
        raise KvtoolError("seq_len is an empty list; give one length or a list of lengths in tokens")
    for length in lens:
        _check_positive("seq_len", length, "give the sample length in tokens")
    return [int(x) for x in lens]


def _check_depths(depths: Sequence[float], n_needles: int) -> list[float]:
    out = [float(d) for d in depths]
    if len(out) != n_needles:
        raise KvtoolError(f"got {len(out)} depths for {n_needles} needles; give one depth per needle")
    bad = [d for d in out if not 0.0 <= d <= 1.0]
    if bad:
        raise KvtoolError(f"needle depth {bad[0]} is outside [0, 1]; depths are fractions of the haystack")
    return sorted(out)


def _plan(tokenizer, i: int, seq_len: int, seed: int, n_needles: int, words_per_needle: int,
          depths: list[float] | None, head: int) -> _Plan:
    rng = np.random.default_rng(seed + i)
    if depths is None:
        depths = sorted(float(d) for d in rng.choice(_DEPTH_GRID, n_needles, replace=n_needles > len(_DEPTH_GRID)))
    words = [[NATO_WORDS[k] for k in rng.integers(0, len(NATO_WORDS), words_per_needle)] for _ in range(n_needles)]
    pieces, answers = [], []
    for j, ws in enumerate(words):
        nth = ordinal(j + 1)
        key = _encode(tokenizer, " " + " ".join(ws))  # encoded once, reused for needle and answer
        pieces.append((_encode(tokenizer, f"\nThe {nth} passkey is:"), key, _encode(tokenizer, ". Remember it.\n")))
        answers.append((_encode(tokenizer, f"\nWhat is the {nth} passkey? The {nth} passkey is:"),
                        _encode(tokenizer, ".")))
    fixed = head + sum(len(a) + len(b) + len(c) for a, b, c in pieces)
    fixed += sum(len(q) + len(key) + len(e) for (q, e), (_, key, _) in zip(answers, pieces))
    return _Plan(seq_len, depths, words, pieces, answers, fixed, float(rng.random()))


def _haystack_ids(tokenizer, need: int, source: str = "pydoc") -> list[int]:
    """Tokenise a long slice of the haystack once; tile it if even the whole text is too short."""
    return text_ids(source, tokenizer, need, tile=True)


def _assemble(plan: _Plan, head: list[int], hay: list[int], i: int, seed: int, source: str = _HAYSTACK_SOURCE) -> Sample:
    H = plan.hay_len
    offset = int(plan.u * (len(hay) - H + 1))
    window = hay[offset:offset + H]
    ids, needle_spans, answer_spans, prev = list(head), [], [], 0
    for d, (pre, key, post) in zip(plan.depths, plan.pieces):
        cut = int(round(d * H))
        ids += window[prev:cut] + pre
        needle_spans.append((len(ids), len(ids) + len(key)))
        ids += key + post
        prev = cut
    ids += window[prev:]
    qa_start = len(ids)
    for (q, end), (_, key, _) in zip(plan.answers, plan.pieces):
        ids += q
        answer_spans.append((len(ids), len(ids) + len(key)))
        ids += key + end
    assert len(ids) == plan.seq_len
    pairs = [(a + t, n + t) for (a, _), (n, m) in zip(answer_spans, needle_spans) for t in range(m - n)]
    meta = {"kind": "passkey", "source": source, "sample": i, "seed": seed, "seq_len": plan.seq_len,
            "depths": plan.depths, "passkeys": [" ".join(w) for w in plan.words], "haystack_offset": offset,
            "qa_start": qa_start}
    return Sample(torch.tensor(ids, dtype=torch.int64),  # input_ids: [T]
                  torch.tensor(pairs, dtype=torch.int64).view(-1, 2),  # copy_pairs: [N, 2]
                  needle_spans, answer_spans, meta)


def passkey_samples(tokenizer, n_samples: int, seq_len: int | Sequence[int], *, n_needles: int = 3,
                    words_per_needle: int = 8, depths: Sequence[float] | None = None,
                    seed: int = 42, text: str = "pydoc") -> SampleStream:
    """DuoAttention-style passkey samples of exactly `seq_len` tokens (a list of lengths cycles over samples).

    The samples are made one at a time as they are read (a SampleStream), so any number of them takes the memory
    of one. The layout is checked on the first samples here; a later sample too short for its needles (seq_len
    barely above the minimum and longer passkey words) raises the same error when it is made. `text`: the haystack's
    text source (a TEXT_SOURCES name or a .txt / .jsonl path; default pydoc)."""
    _check_samples(n_samples)
    check_text_source(text, passkey=False, flag="text")
    _check_positive("n_needles", n_needles, "use 1 or more needles")
    _check_positive("words_per_needle", words_per_needle, "use 1 or more words per passkey")
    fixed_depths = None if depths is None else _check_depths(depths, n_needles)
    head = _bos(tokenizer) + _encode(tokenizer, INTRO)
    lens = _lengths(seq_len)

    def plan(i: int) -> _Plan:
        return _plan(tokenizer, i, lens[i % len(lens)], seed, n_needles, words_per_needle, fixed_depths, len(head))

    def refuse(plans: list[_Plan]) -> None:
        short = [p for p in plans if p.hay_len < 0]
        if short:
            need = max(p.fixed for p in plans)
            raise KvtoolError(f"seq_len {short[0].seq_len} is too short for the passkey layout: intro + {n_needles} "
                              f"needles + answers need at least {need} tokens; raise seq_len or use fewer "
                              "needles/words")

    refuse([plan(i) for i in range(min(int(n_samples), 16))])
    hay = _haystack_ids(tokenizer, max(lens), text)  # every window fits: a haystack is shorter than its sample
    source = _HAYSTACK_SOURCE if text == "pydoc" else text

    def make(i: int) -> Sample:
        p = plan(i)
        refuse([p])
        return _assemble(p, head, hay, i, seed, source)

    return SampleStream(n_samples, make, lens)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"     # the end of every numeric pass-key prompt


def numeric_passkey_prompts(tokenizer, specs: Sequence[tuple[int, float]], seed: int = 0,
                            haystack: str = "filler") -> list[tuple[torch.Tensor, str]]:
    """Classic pass-key prompts (Mohtashami & Jaggi, Landmark Attention, arXiv 2305.16300): a 5-digit key stated
    twice inside a haystack, then "What is the pass key? The pass key is". One (prompt ids [T], key) per
    (length, depth) in `specs`; the prompt has exactly `length` tokens and ends where the answer starts.

    haystack "filler": the paper's repeated filler sentences (the key is the only new information, so a model that
    can read its whole context finds it); a text source ("pydoc": Python's own documentation, "stdlib": standard
    library docstrings, or a .txt / .jsonl path): a random window of that text (a harder needle task).
    """
    check_text_source(haystack, passkey=True, flag="pass-key haystack")
    intro = _encode(tokenizer, "There is an important pass key hidden inside a lot of irrelevant text. "
                               "Find it and memorize it.\n\n")
    question = _encode(tokenizer, PASSKEY_QUESTION)
    need = max((int(n) for n, _ in specs), default=1)
    if haystack == FILLER_NAME:
        unit = _encode(tokenizer, FILLER)
        hay = unit * (need // len(unit) + 2)
    else:
        hay = _haystack_ids(tokenizer, need, haystack)
    out = []
    for i, (length, depth) in enumerate(specs):
        rng = np.random.default_rng(seed + i)
        key = str(int(rng.integers(10000, 100000)))
        needle = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
        n = int(length) - len(_bos(tokenizer)) - len(intro) - len(needle) - len(question)
        if n < 1:
            raise KvtoolError(f"pass-key prompt of {length} tokens is too short; give at least {int(length) - n + 1}")
        start = int(rng.integers(0, len(hay) - n + 1)) if haystack != FILLER_NAME else 0
        window, cut = hay[start:start + n], int(float(depth) * n)
        ids = _bos(tokenizer) + intro + window[:cut] + needle + window[cut:] + question
        out.append((torch.tensor(ids, dtype=torch.int64), key))              # prompt: [T]
    return out


def text_file_samples(path: str | os.PathLike, tokenizer, seq_len: int,
                      n_samples: int | None = None) -> SampleStream:
    """Consecutive non-overlapping `seq_len`-token windows of a .txt / .jsonl file (BOS first, if any); each window
    becomes a Sample when it is read (a SampleStream)."""
    if n_samples is not None:
        _check_samples(n_samples)
    bos = _bos(tokenizer)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= len(bos):
        raise KvtoolError(f"seq_len must be a whole number above {len(bos)} (got {seq_len!r}); give the length in tokens")
    text = _read_text(Path(path), getattr(tokenizer, "eos_token", None) or "\n\n")
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.int64)                 # [N] the whole file
    width = int(seq_len) - len(bos)
    n_win = ids.numel() // width
    if n_win == 0:
        raise KvtoolError(f"data file {path} has only {ids.numel()} tokens, too few for one sample of {seq_len} "
                          "tokens; use a longer file or a smaller seq_len")
    take = n_win if n_samples is None else min(n_samples, n_win)
    head = torch.tensor(bos, dtype=torch.int64)

    def make(i: int) -> Sample:
        return Sample(torch.cat([head, ids[i * width:(i + 1) * width]]),           # input_ids: [seq_len]
                      torch.zeros((0, 2), dtype=torch.int64), [], [],            # copy_pairs: [0, 2]
                      {"kind": "text", "source": os.fspath(path), "window": i})

    return SampleStream(take, make, [int(seq_len)])


def check_data(data: str | None, seq_len: int) -> None:
    """Refuse a data file that cannot give one sample, without a tokenizer (before any model is loaded): missing,
    wrong type, unreadable, not UTF-8, malformed JSONL, no text, or fewer bytes than one sample has tokens (a token
    holds at least one byte of text). The exact token count is checked again when the samples are made."""
    if _is_passkey(data):
        return
    path = Path(data)
    text = _read_text(path, "\n\n")
    if not text.strip():
        raise KvtoolError(f"data file {path} has no text; give a .txt file or .jsonl lines of {{\"text\": ...}}")
    size = len(text.encode("utf-8"))
    if size + 2 < seq_len:          # + 2: a leading BOS and a tokenizer's lone prefix-space token
        raise KvtoolError(f"data file {path} has only {size} bytes of text, too few for one sample of {seq_len} "
                          "tokens; use a longer file or a smaller seq_len")


def _is_passkey(data: str | None) -> bool:
    return data is None or data == "passkey"


def load_samples(data: str | None, tokenizer, n_samples: int, seq_len: int, *, seed: int = 42,
                 **passkey_kwargs) -> SampleStream:
    """data None or "passkey" -> passkey_samples; otherwise a path to .txt or .jsonl -> text_file_samples."""
    _check_samples(n_samples)
    if _is_passkey(data):
        return passkey_samples(tokenizer, n_samples, seq_len, seed=seed, **passkey_kwargs)
    return text_file_samples(data, tokenizer, seq_len, n_samples)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(data: str | None) -> dict:
    """Json-serialisable provenance of the calibration data."""
    if _is_passkey(data):
        digest = hashlib.sha256(haystack_text().encode("utf-8")).hexdigest()
        return {"kind": "passkey", "source": _HAYSTACK_SOURCE, "python": platform.python_version(),
                "haystack_sha256": digest}
    path = Path(data).resolve()
    if not path.is_file():
        raise KvtoolError(f"no such data file: {data}; give 'passkey' or an existing .txt / .jsonl file")
    try:
        return {"kind": "file", "path": str(path), "sha256": _sha256(path), "size": path.stat().st_size}
    except OSError as e:
        raise KvtoolError(f"cannot read data file {path}: {e.strerror or e}; check that it is a readable file")
