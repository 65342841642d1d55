"""Long-context evaluation tasks for `kvtool run/bench --task`, beyond `passkey` and `nll` (issue 14).

Every task puts something into a haystack (a window of a text source, kvtool.texts.TEXT_SOURCES, or the pass-key
filler) at a depth, and asks for it back at the end of the context, so the answer needs distant tokens:

  copy          induction / copy (the mechanism of induction heads, Olsson et al., arXiv 2209.11895): a span of
                random words stands once in the haystack; the prompt ends with the span's first words and the model
                must continue the rest. Correct: the greedy continuation equals the rest of the span token for token.
  copy-digits   the same with random digits: a line of DIGIT_GROUPS groups of 4 random digits stands once in the
                haystack; the prompt ends with its first DIGIT_CUE groups, the model must continue the rest, digit for
                digit. Words drew prior-driven slips from the embedded model ("examples" for "example", a line cut
                short); digits carry no prior, so the task measures the distant copy alone.
  lookup        multi-key lookup (a key-value retrieval in the style of Liu et al., "Lost in the Middle", arXiv
                2307.03172): several "key: value" lines (random words, 4-digit values) scattered through the
                haystack; the prompt asks for one key. Correct: the value is in the answer.
  passkey-chat  the classic pass key (Mohtashami & Jaggi, arXiv 2305.16300) inside the model's chat template (for an
                instruct model), the assistant's turn started with "The pass key is". Correct: the key is in the answer.
  nll-repeat    long-range NLL: a span of natural text (from elsewhere in the source) stands once in the haystack; the
                context ends with its first tokens, and the NLL is read on the rest of its second occurrence only
                (tokens a model predicts from the distant copy; streaming heads that lost it should hurt).

TASKS maps a name to a Task (its generator and how it is scored). Generators take (tokenizer, lengths, depths, seed,
text) and return one sample per (length, depth): (prompt ids [T], answer ids [A], answer text) for a generation task,
(context ids [C], continuation ids [N]) for an NLL task; the sample has exactly `length` tokens (prompt, or
context + continuation). Sample i draws from numpy's generator seeded by [seed, i], so seeds give disjoint streams
(the pre-registered evaluation uses seed 0; pilots and duo training use other seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from kvtool.data import FILLER
from kvtool.texts import FILLER_NAME, _bos, _encode, check_text_source, text_ids
from kvtool.errors import KvtoolError

SPAN_WORDS = 8           # copy: words in the random span
CUE_WORDS = 4            # copy: words of the span that end the prompt (the rest is the answer)
DIGIT_GROUPS = 4         # copy-digits: groups of 4 random digits on the line
DIGIT_CUE = 2            # copy-digits: of those, groups that end the prompt (the rest is the answer)
LOOKUP_KEYS = 8          # lookup: key-value lines in the haystack
REPEAT_SPAN = 96         # nll-repeat: tokens of the repeated span
REPEAT_CUE = 8           # nll-repeat: of those, tokens that end the context (the rest is scored)
COMMON_IDS = 12000       # copy / lookup words: token ids below this
_SPARE = 4               # greedy steps past the answer's length (a leading space or newline)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                                  # "generate" (accuracy) or "nll"
    make: Callable                             # (tokenizer, lengths, depths, seed, text) -> samples
    about: str
    default_text: str                          # the haystack when --text is not given
    exact: bool = False                        # generate: correct = the continuation equals the answer ids
    answer_tokens: int = 16                    # generate: most tokens an answer may take (context-length checks)
    question: Callable | None = None           # (tokenizer) -> the ids every prompt ends with (the question), for
                                               # --query after; None: the task has no question to hold back


@lru_cache(maxsize=4)
def _word_pool(tokenizer) -> tuple[tuple[int, str], ...]:
    """(token id, " word") of the 4-to-8-letter lowercase words of Python's documentation (kvtool.texts.haystack_text,
    whole words, so no word fragments such as " happ": the model skips those when copying) that the tokenizer
    encodes, after a space, as one token below id COMMON_IDS (frequent ones): the random words of `copy` and the keys
    of `lookup`. Sorted by id, so the pool is fixed for a given Python version and tokenizer."""
    import re

    from kvtool.texts import haystack_text

    words = sorted(set(re.findall(r"(?<![A-Za-z_])[a-z]{4,8}(?![A-Za-z_])", haystack_text())))
    out = set()
    for w in words:
        ids = _encode(tokenizer, " " + w)
        if len(ids) == 1 and ids[0] < COMMON_IDS:
            out.add((ids[0], " " + w))
    pool = tuple(sorted(out))
    if len(pool) < 64:
        raise KvtoolError("this tokenizer has too few single-token words for the copy / lookup tasks")
    return pool


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(i)])


def _haystack(tokenizer, text: str, need: int) -> list[int]:
    if text == FILLER_NAME:
        unit = _encode(tokenizer, FILLER)
        return unit * (need // len(unit) + 2)
    return text_ids(text, tokenizer, need, tile=True)


def _window(hay: list[int], n: int, rng, text: str) -> tuple[int, list[int]]:
    """(start, n haystack ids from start): a random window of a text, the start of the filler."""
    if n < 1:
        raise KvtoolError(f"the prompt is too short for this task: {1 - n} more tokens are needed")
    start = 0 if text == FILLER_NAME else int(rng.integers(0, len(hay) - n + 1))
    return start, hay[start:start + n]


def _specs(lengths, depths) -> list[tuple[int, float]]:
    return [(int(n), float(d)) for n in lengths for d in depths]


def _line_samples(tokenizer, lengths, depths, seed: int, text: str, cue: int, draw) -> list:
    """(prompt [T], answer ids, answer text) per (length, depth): a line of units (draw(rng) -> [ids of each unit])
    between two newlines at `depth` of the haystack; the prompt ends with a newline and the first `cue` units, the
    answer is the rest. The line generator of `copy` and `copy-digits`."""
    nl = _encode(tokenizer, "\n")
    need = max((n for n, _ in _specs(lengths, depths)), default=1)
    hay = _haystack(tokenizer, text, need)
    out = []
    for i, (length, depth) in enumerate(_specs(lengths, depths)):
        rng = _rng(seed, i)
        units = draw(rng)
        line = [t for u in units for t in u]
        tail = nl + [t for u in units[:cue] for t in u]
        n = length - len(_bos(tokenizer)) - (len(line) + 2 * len(nl)) - len(tail)
        _, window = _window(hay, n, rng, text)
        cut = int(depth * n)
        ids = _bos(tokenizer) + window[:cut] + nl + line + nl + window[cut:] + tail
        answer = [t for u in units[cue:] for t in u]
        out.append((torch.tensor(ids, dtype=torch.int64), answer, tokenizer.decode(answer)))   # prompt: [T]
    return out


def copy_samples(tokenizer, lengths, depths, seed: int = 0, text: str = FILLER_NAME, span: int = SPAN_WORDS,
                 cue: int = CUE_WORDS):
    """copy: (prompt [T], answer ids, answer text) per (length, depth). The span is `span` random one-token words
    between two newlines at `depth` of the haystack; the prompt ends with a newline and its first `cue` words."""
    if not 1 <= cue < span:
        raise KvtoolError(f"copy: the cue ({cue} words) must be shorter than the span ({span} words)")
    check_text_source(text, passkey=True, flag="copy haystack")
    pool = _word_pool(tokenizer)
    return _line_samples(tokenizer, lengths, depths, seed, text, cue,
                         lambda rng: [[pool[j][0]] for j in rng.choice(len(pool), span, replace=False)])


def copy_digits_samples(tokenizer, lengths, depths, seed: int = 0, text: str = FILLER_NAME,
                        groups: int = DIGIT_GROUPS, cue: int = DIGIT_CUE):
    """copy-digits: (prompt [T], answer ids, answer text) per (length, depth). A line of `groups` groups of 4 random
    digits ("4821 7730 1956 3342") stands between two newlines at `depth` of the haystack; the prompt ends with a
    newline and its first `cue` groups, the answer is the rest (" 1956 3342"), each group encoded on its own."""
    if not 1 <= cue < groups:
        raise KvtoolError(f"copy-digits: the cue ({cue} groups) must be shorter than the line ({groups} groups)")
    check_text_source(text, passkey=True, flag="copy-digits haystack")

    def draw(rng):
        return [_encode(tokenizer, " " * (g > 0) + "".join(str(int(d)) for d in rng.integers(0, 10, 4)))
                for g in range(groups)]

    return _line_samples(tokenizer, lengths, depths, seed, text, cue, draw)


def lookup_samples(tokenizer, lengths, depths, seed: int = 0, text: str = "stdlib", keys: int = LOOKUP_KEYS):
    """lookup: `keys` lines "key: value" (distinct random words, 4-digit values) spread evenly through the haystack;
    the asked key's line stands at `depth`. The user's turn of the chat template (plain text for a tokenizer without
    one) asks "What is the value of <key>?"; the assistant's turn starts "The value of <key> is"."""
    check_text_source(text, passkey=True, flag="lookup haystack")
    pool = _word_pool(tokenizer)
    need = max((n for n, _ in _specs(lengths, depths)), default=1)
    hay = _haystack(tokenizer, text, need)
    out = []
    for i, (length, depth) in enumerate(_specs(lengths, depths)):
        rng = _rng(seed, i)
        names = [pool[j][1].strip() for j in rng.choice(len(pool), keys, replace=False)]
        values = [str(int(v)) for v in rng.integers(1000, 10000, keys)]
        lines = [_encode(tokenizer, f"\n{k}: {v}\n") for k, v in zip(names, values)]
        ask = int(rng.integers(keys))
        head, tail = _frame(tokenizer, LOOKUP_PROMPT.format(haystack=_MARK, key=names[ask]),
                            LOOKUP_ANSWER.format(key=names[ask]))
        n = length - len(head) - sum(map(len, lines)) - len(tail)
        _, window = _window(hay, n, rng, text)
        # the asked line at `depth`, the others at evenly spread depths in a random order
        others = [d for d in np.linspace(0.05, 0.95, keys) if abs(d - depth) > 1e-9][:keys - 1]
        where = list(rng.permutation(others))
        where.insert(ask, depth)
        ids, prev = list(head), 0
        for d, line in sorted(zip(where, lines), key=lambda p: p[0]):
            cut = int(d * n)
            ids += window[prev:cut] + line
            prev = cut
        ids += window[prev:] + tail
        answer = _encode(tokenizer, " " + values[ask])
        out.append((torch.tensor(ids, dtype=torch.int64), answer, values[ask]))                 # prompt: [T]
    return out


_MARK = "\u2063KVTOOL-HAYSTACK\u2063"
LOOKUP_PROMPT = ("Below is a long text with some key: value lines hidden in it. Remember the values.\n\n{haystack}"
                 "\n\nWhat is the value of {key}?")
LOOKUP_ANSWER = "The value of {key} is"


def _frame(tokenizer, prompt: str, answer_start: str) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the haystack marker in `prompt` as the user's turn of the chat template with the
    assistant's turn started by `answer_start` (BOS + prompt + " " + answer_start without a template)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
    else:
        rendered = prompt + " "
    if rendered.count(_MARK) != 1:
        raise KvtoolError("the tokenizer's chat template does not keep the user's text as it is")
    before, after = rendered.split(_MARK)
    return _bos(tokenizer) * (not getattr(tokenizer, "chat_template", None)) + _encode(tokenizer, before), \
        _encode(tokenizer, after + answer_start)


CHAT_PROMPT = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
               "{haystack}\n\nWhat is the pass key? Answer with the 5-digit number only.")
CHAT_ANSWER = "The pass key is"

def chat_passkey_question(tokenizer) -> list[int]:
    """The ids every passkey-chat prompt ends with: the question after the haystack, the end of the user's turn and
    the assistant's turn up to "The pass key is" (what `--query after` appends once the context is compressed)."""
    return _frame(tokenizer, CHAT_PROMPT.format(haystack=_MARK), CHAT_ANSWER)[1]


def chat_passkey_samples(tokenizer, lengths, depths, seed: int = 0, text: str = FILLER_NAME):
    """passkey-chat: the classic pass-key prompt as the user's turn of the tokenizer's chat template; the assistant's
    turn starts with "The pass key is". The template is rendered around a marker and the haystack's ids go where the
    marker was, so every prompt has exactly `length` tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise KvtoolError("--task passkey-chat needs a tokenizer with a chat template (an instruct model)")
    check_text_source(text, passkey=True, flag="passkey-chat haystack")
    head, tail = _frame(tokenizer, CHAT_PROMPT.format(haystack=_MARK), CHAT_ANSWER)
    need = max((n for n, _ in _specs(lengths, depths)), default=1)
    hay = _haystack(tokenizer, text, need)
    out = []
    for i, (length, depth) in enumerate(_specs(lengths, depths)):
        rng = _rng(seed, i)
        key = str(int(rng.integers(10000, 100000)))
        needle = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
        n = length - len(head) - len(needle) - len(tail)
        _, window = _window(hay, n, rng, text)
        cut = int(depth * n)
        ids = head + window[:cut] + needle + window[cut:] + tail
        out.append((torch.tensor(ids, dtype=torch.int64), _encode(tokenizer, " " + key), key))  # prompt: [T]
    return out


def repeat_nll_samples(tokenizer, lengths, depths, seed: int = 0, text: str = "stdlib", span: int = REPEAT_SPAN,
                       cue: int = REPEAT_CUE):
    """nll-repeat: (context [C], continuation [N]) per (length, depth), C + N = length. A `span`-token passage of the
    text (cut from where the haystack window is not) stands between newlines at `depth`; the context ends with a
    newline and the passage's first `cue` tokens, the continuation is the rest of it (the only scored tokens)."""
    if not 1 <= cue < span:
        raise KvtoolError(f"nll-repeat: the cue ({cue} tokens) must be shorter than the span ({span} tokens)")
    check_text_source(text, passkey=True, flag="nll-repeat text")
    nl = _encode(tokenizer, "\n")
    need = max((n for n, _ in _specs(lengths, depths)), default=1)
    hay = _haystack(tokenizer, text, 2 * need + 2 * span)
    out = []
    for i, (length, depth) in enumerate(_specs(lengths, depths)):
        rng = _rng(seed, i)
        n = length - len(_bos(tokenizer)) - (span + 2 * len(nl)) - (len(nl) + cue) - (span - cue)
        w0, window = _window(hay, n, rng, text)
        after = w0 + n
        # the passage: `span` tokens outside the window (after it, or before it when the window ends the text)
        p0 = after if after + span <= len(hay) else max(0, w0 - span)
        passage = hay[p0:p0 + span]
        cut = int(depth * n)
        ids = _bos(tokenizer) + window[:cut] + nl + passage + nl + window[cut:] + nl + passage[:cue]
        out.append((torch.tensor(ids, dtype=torch.int64), torch.tensor(passage[cue:], dtype=torch.int64)))
    return out



TASKS: dict[str, Task] = {
    "copy": Task("copy", "generate", copy_samples, "continue a span of random words seen once earlier (induction)",
                 FILLER_NAME, exact=True, answer_tokens=SPAN_WORDS - CUE_WORDS + _SPARE),
    "copy-digits": Task("copy-digits", "generate", copy_digits_samples,
                        "continue a line of random 4-digit groups seen once earlier (induction)", FILLER_NAME,
                        exact=True, answer_tokens=5 * (DIGIT_GROUPS - DIGIT_CUE) + _SPARE),
    "lookup": Task("lookup", "generate", lookup_samples, f"the value of one of {LOOKUP_KEYS} key: value lines",
                   "stdlib", answer_tokens=16),
    "passkey-chat": Task("passkey-chat", "generate", chat_passkey_samples,
                         "the pass key inside the chat template", FILLER_NAME, answer_tokens=16,
                         question=chat_passkey_question),
    "nll-repeat": Task("nll-repeat", "nll", repeat_nll_samples,
                       "NLL of the second occurrence of a repeated passage only (long-range NLL)", "stdlib"),
}


def names() -> list[str]:
    return list(TASKS)


def get(name: str) -> Task:
    if name not in TASKS:
        raise KvtoolError(f"unknown task {name!r} (passkey, nll, {', '.join(TASKS)})")
    return TASKS[name]


def samples(name: str, tokenizer, lengths: Sequence[int], depths: Sequence[float], seed: int = 0,
            text: str | None = None):
    task = get(name)
    return task.make(tokenizer, [int(n) for n in lengths], [float(d) for d in depths], seed,
                     text if text is not None else task.default_text)


def correct(task: Task, got: list[int], answer_ids: list[int], answer: str, tokenizer) -> bool:
    """exact: the first len(answer_ids) generated ids are the answer's; else the answer's text is in the decoded
    continuation."""
    if task.exact:
        return got[:len(answer_ids)] == list(answer_ids)
    return answer in tokenizer.decode(got)


def question_ids(task: str, tokenizer, query: str) -> list[int] | None:
    """The question `--query after` holds back for `task` (None with query "inside"); one line for a task without
    one."""
    if query == "inside":
        return None
    if not takes_query_after(task):
        raise KvtoolError(f"--query after applies to --task passkey and passkey-chat, not {task}")
    if task == "passkey":
        from kvtool.data import PASSKEY_QUESTION

        return _encode(tokenizer, PASSKEY_QUESTION)
    return get(task).question(tokenizer)


def takes_query_after(task: str) -> bool:
    """Whether `task` has a question that `--query after` can hold back (passkey, and tasks with Task.question)."""
    return task == "passkey" or (task in TASKS and TASKS[task].question is not None)


@torch.inference_mode()
def run_generate(model, tokenizer, samples, spec: str, task: str, profile=None, chunk: int = 512,
                 backend: str = "auto", query: str = "inside", reuse: bool = False):
    """A generation task under cache `spec`: chunked prefill, then greedy decoding of len(answer)+4 tokens; per-sample
    hits (TaskResult.hits, so paired bootstrap intervals work) and the accuracy. `query` "after" (tasks with a
    question): the context is prefilled and compressed first, then the question (kvtool.evaluate.prompt_in).
    `reuse`: resume prefills from an earlier sample's saved state of the same start (kvtool.prefix_reuse)."""
    from kvtool.baselines import make_cache
    from kvtool.evaluate import Meter, _device, greedy, prompt_in, reuse_plan

    t = get(task)
    question = question_ids(task, tokenizer, query)
    m = Meter(make_cache(model, profile, spec, backend))
    dev = _device(model)
    plan = reuse_plan(tokenizer, [s[0] for s in samples], query, chunk, question, reuse=reuse)
    hits = []
    for i, (prompt, answer_ids, answer) in enumerate(samples):
        cache = m.handle.fresh()
        with m.pre:
            logits, cache = prompt_in(model, tokenizer, prompt, cache, chunk, query, dev, question,
                                      reuse=plan, index=i)                                   # [1, V]
        m.n_pre += prompt.numel() - (plan.last_reused if plan else 0)
        got = greedy(model, cache, logits, len(answer_ids) + _SPARE, m)
        hits.append(correct(t, got, answer_ids, answer, tokenizer))
        m.held(cache)
        m.step_read(cache)
    return m.result(spec, task, len(samples), correct=sum(hits), hits=hits,
                    query=None if query == "inside" else query, reused_tokens=plan.reused_tokens if plan else 0)
