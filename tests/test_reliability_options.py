"""Bad options, policies and data (issue 10, points 10 and 11): each gives one line `Error: ...`, a non-zero exit, no
traceback, leaves the working directory as it was, and — for everything that can be known without the weights — is
refused before the model loads (`kvtool.models.load_model` is replaced by a function that fails the test).

Everything runs on a tiny random Llama saved to disk with a small BPE tokenizer trained in-process (no embedded
model). The table of these cases is docs/reliability.md (section "Options, policies and data").
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import cli_exit_code
from kvtool.errors import KvtoolError

MODEL = "model"              # the tiny model's directory, relative to the working directory of every CLI case
CONTEXT = 256                # its max_position_embeddings
TEXT = dict(seq=["--seq-len", "64", "--sink", "4", "--recent", "16"])


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvtool.texts import haystack_text

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([haystack_text()[:60_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _run(*args) -> int:
    """The console entry point in-process; its exit code (read the output with capsys)."""
    return cli_exit_code(*args)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _one_line_error(code: int, out: str, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, (out, err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err and out.strip() == "", (out, err)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the tiny model, a real profile of it, and every kind of bad file."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtool.texts import haystack_text

    root = tmp_path_factory.mktemp("reliability")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / MODEL)
    tok.save_pretrained(root / MODEL)
    (root / "text.txt").write_text(haystack_text()[:6000])
    (root / "empty.txt").write_text("")
    (root / "blank.jsonl").write_text("\n  \n\n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    (root / "short.txt").write_text("just a few words")
    (root / "data.csv").write_text("a,b\n1,2\n")
    (root / "garbage.kv.st").write_bytes(b"\x00\x01not a safetensors file" * 20)
    save_file({"x": torch.zeros(2)}, str(root / "foreign.kv.st"))
    (root / "adir").mkdir()
    argv = ["profile", root / MODEL, "--data", root / "text.txt", "--samples", "2", *TEXT["seq"],
            "-o", root / "good.kv.st"]
    assert _run(*argv) == 0 and (root / "good.kv.st").is_file()
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    before = _snapshot(workdir)
    yield workdir
    assert _snapshot(workdir) == before, "the working directory changed"


@pytest.fixture
def no_model_load(monkeypatch):
    import kvtool.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: this input must be refused before loading it")

    monkeypatch.setattr(kvtool.models, "load_model", refuse)


HUGE = "99999999999999999999"
NLL = ["--task", "nll", "--samples", "1", "--context", "64", "--continuation", "8"]
BENCH = ["--baselines", "none", "--policies", "heads=none,sink=4,recent=16"]

# (id, argv, what the one line must say); every one is refused before the model loads
BEFORE_LOAD = [
    # memory
    ("profile-samples-huge", ["profile", MODEL, "--samples", HUGE], "at most 1000000"),
    ("run-nll-samples-huge", ["run", MODEL, *NLL, "--samples", HUGE], "at most 1000000"),
    ("calibrate-samples-huge", ["calibrate", "-m", "retrieval", MODEL, "--samples", HUGE], "at most 1000000"),
    ("bench-nll-too-much-text", ["bench", MODEL, *BENCH, "--task", "nll", "--samples", "100000", "--context", "200"],
     "built-in document"),
    # context length
    ("profile-seq-len-too-long", ["profile", MODEL, "--seq-len", "100000"], "context of 256"),
    ("run-context-too-long", ["run", MODEL, *NLL, "--context", "100000"], "context of 256"),
    ("run-context-plus-continuation", ["run", MODEL, *NLL, "--context", "200", "--continuation", "50"],
     "context of 256"),
    ("run-lengths-too-long", ["run", MODEL, "--task", "passkey", "--lengths", "8300"], "context of 256"),
    ("bench-context-too-long", ["bench", MODEL, *BENCH, "--context", "100000"], "context of 256"),
    ("bench-lengths-too-long", ["bench", MODEL, *BENCH, "--task", "passkey", "--lengths", "96,300"],
     "context of 256"),
    ("calibrate-seq-len-too-long", ["calibrate", "-m", "retrieval", MODEL, "--seq-len", "100000"], "context of 256"),
    # ordinary mistakes
    ("run-prompt-empty", ["run", MODEL, "--prompt", ""], "--prompt is empty"),
    ("run-prompt-blank", ["run", MODEL, "--prompt", "   "], "--prompt is empty"),
    ("run-prompt-file-empty", ["run", MODEL, "--prompt-file", "empty.txt"], "has no text"),
    ("run-prompt-file-dir", ["run", MODEL, "--prompt-file", "adir"], "is not a file"),
    ("run-max-new-tokens-0", ["run", MODEL, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("run-max-new-tokens-neg", ["run", MODEL, "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    ("run-chunk-0", ["run", MODEL, *NLL, "--chunk", "0"], "--chunk must be at least 1"),
    ("run-chunk-neg", ["run", MODEL, *NLL, "--chunk", "-1"], "--chunk must be at least 1"),
    ("run-context-0", ["run", MODEL, *NLL, "--context", "0"], "--context must be at least 1"),
    ("run-continuation-0", ["run", MODEL, *NLL, "--continuation", "0"], "--continuation must be at least 2"),
    ("run-continuation-1", ["run", MODEL, *NLL, "--continuation", "1"], "--continuation must be at least 2"),
    ("run-nll-samples-0", ["run", MODEL, *NLL, "--samples", "0"], "zero samples"),
    ("run-depths-neg", ["run", MODEL, "--task", "passkey", "--lengths", "96", "--depths", "-2"], "--depths"),
    ("run-depths-0", ["run", MODEL, "--task", "passkey", "--lengths", "96", "--depths", "0"], "--depths"),
    ("run-seed-neg", ["run", MODEL, *NLL, "--seed", "-1"], "--seed must be from 0"),
    ("run-seed-huge", ["run", MODEL, *NLL, "--seed", HUGE], "--seed must be from 0"),
    ("profile-seed-neg", ["profile", MODEL, "--seed", "-1"], "--seed must be from 0"),
    ("profile-needles-0", ["profile", MODEL, "--needles", "0"], "--needles must be at least 1"),
    ("profile-dtype", ["profile", MODEL, "--dtype", "float8"], "unknown dtype"),
    ("bench-threads-neg", ["bench", MODEL, *BENCH, "--threads", "-1"], "--threads"),
    ("bench-threads-0", ["bench", MODEL, *BENCH, "--threads", "0"], "--threads"),
    ("bench-decode-steps-0", ["bench", MODEL, *BENCH, "--decode-steps", "0"], "--decode-steps"),
    ("bench-decode-steps-neg", ["bench", MODEL, *BENCH, "--decode-steps", "-3"], "--decode-steps"),
    ("bench-depths-0", ["bench", MODEL, *BENCH, "--task", "passkey", "--lengths", "96", "--depths", "0"], "--depths"),
    # policies and specs
    ("run-policy-empty", ["run", MODEL, *NLL, "--policy", ""], "--policy is empty"),
    ("run-policy-heads-neg", ["run", MODEL, *NLL, "--policy", "heads=-1"], "fraction -1.0 is outside [0, 1]"),
    ("run-policy-random-seed-huge", ["run", MODEL, *NLL, "--policy", f"heads=random:0.5:{HUGE}"], "2**63 - 1"),
    ("run-policy-unknown-method", ["run", MODEL, *NLL, "--policy", "heads=nosuch:0.5"], "names no calibration"),
    ("run-policy-markup", ["run", MODEL, *NLL, "--policy", "heads=[red]x"], "neither a fraction nor a method"),
    ("run-policy-sink-neg", ["run", MODEL, *NLL, "--policy", "heads=none,sink=-4"], "'sink' must be at least 0"),
    ("bench-policies-empty-list", ["bench", MODEL, "--baselines", "none", "--policies", ";;"], "names nothing"),
    ("bench-baselines-empty-list", ["bench", MODEL, "--baselines", " ; ", "--policies", "heads=all"],
     "names nothing"),
    ("bench-streaming-neg-sink", ["bench", MODEL, "--baselines", "streaming:-1:5", "--policies", "heads=all"],
     "'streaming:-1:5': sink must be at least 0"),
    ("bench-streaming-recent-0", ["bench", MODEL, "--baselines", "streaming:4:0", "--policies", "heads=all"],
     "recent must be at least 1"),
    ("bench-streaming-not-int", ["bench", MODEL, "--baselines", "streaming:4:1e3", "--policies", "heads=all"],
     "whole numbers"),
    # duo
    ("duo-steps-0", ["calibrate", "-m", "duo", MODEL, "--preset", "cpu", "--steps", "0"], "--steps must be at least 1"),
    ("duo-checkpoint-every-0", ["calibrate", "-m", "duo", MODEL, "--preset", "cpu", "--checkpoint", "ck.pt",
                                "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    ("duo-checkpoint-dir", ["calibrate", "-m", "duo", MODEL, "--preset", "cpu", "--checkpoint", "adir"],
     "is a directory"),
    ("duo-checkpoint-missing-dir", ["calibrate", "-m", "duo", MODEL, "--preset", "cpu", "--checkpoint",
                                    "nodir/ck.pt"], "does not exist"),
    ("duo-resume-missing", ["calibrate", "-m", "duo", MODEL, "--preset", "cpu", "--checkpoint", "ck.pt",
                            "--resume"], "does not exist"),
    # data files
    ("data-missing", ["profile", MODEL, *TEXT["seq"], "--data", "nope.txt"], "no such data file"),
    ("data-empty", ["profile", MODEL, *TEXT["seq"], "--data", "empty.txt"], "has no text"),
    ("data-blank-jsonl", ["profile", MODEL, *TEXT["seq"], "--data", "blank.jsonl"], "has no text"),
    ("data-malformed-jsonl", ["profile", MODEL, *TEXT["seq"], "--data", "bad.jsonl"], "line 2 is not valid JSON"),
    ("data-jsonl-no-text", ["profile", MODEL, *TEXT["seq"], "--data", "notext.jsonl"], 'no string "text"'),
    ("data-not-utf8", ["profile", MODEL, *TEXT["seq"], "--data", "latin1.txt"], "not UTF-8"),
    ("data-too-short", ["profile", MODEL, *TEXT["seq"], "--data", "short.txt"], "too few for one sample"),
    ("data-wrong-type", ["profile", MODEL, *TEXT["seq"], "--data", "data.csv"], "unsupported data file type"),
    ("data-directory", ["profile", MODEL, *TEXT["seq"], "--data", "adir"], "is a directory"),
    ("kvquant-data-malformed", ["calibrate", "-m", "kvquant", MODEL, "--profile", "good.kv.st", "--seq-len", "64",
                                "--data", "bad.jsonl", "-o", "q.kv.st"], "not valid JSON"),
    ("kvquant-vgroup-0", ["calibrate", "-m", "kvquant", MODEL, "--profile", "good.kv.st", "--seq-len", "64",
                          "--vgroup", "0", "-o", "q.kv.st"], "vgroup"),
    # --text: the evaluation tasks' text source
    ("run-text-unknown", ["run", MODEL, *NLL, "--text", "wiki"], "no such text source or file"),
    ("bench-text-missing", ["bench", MODEL, *BENCH, *NLL, "--text", "nope.txt"], "no such text source or file"),
    ("run-text-filler-nll", ["run", MODEL, *NLL, "--text", "filler"], "only a numeric pass-key haystack"),
    ("bench-text-empty", ["bench", MODEL, *BENCH, "--task", "passkey", "--lengths", "96", "--text", "empty.txt"],
     "has no text"),
    ("bench-text-wrong-type", ["bench", MODEL, *BENCH, *NLL, "--text", "data.csv"], "unsupported data file type"),
    ("run-text-too-short", ["run", MODEL, *NLL, "--text", "short.txt"], "fewer than the 72 tokens"),
    ("run-text-with-prompt", ["run", MODEL, "--prompt", "hi", "--text", "stdlib"], "--text is read by --task"),
    # slow refusals: sink + recent, profiles
    ("profile-seq-len-vs-window", ["profile", MODEL, "--seq-len", "100", "--sink", "64", "--recent", "64"],
     "must exceed sink + recent"),
    ("run-profile-missing", ["run", MODEL, *NLL, "--profile", "missing.kv.st"], "does not exist"),
    ("run-profile-dir", ["run", MODEL, *NLL, "--profile", "adir"], "is not a file"),
    ("run-profile-garbage", ["run", MODEL, *NLL, "--profile", "garbage.kv.st"], "not a readable safetensors"),
    ("bench-profile-foreign", ["bench", MODEL, *BENCH, "--profile", "foreign.kv.st"], "not a kvtool profile"),
    ("calibrate-profile-missing", ["calibrate", "-m", "razor", MODEL, "--profile", "missing.kv.st"],
     "does not exist"),
    ("calibrate-profile-foreign", ["calibrate", "-m", "razor", MODEL, "--profile", "foreign.kv.st", "-o", "r.kv.st"],
     "not a kvtool profile"),
    ("razor-probe-len-0", ["calibrate", "-m", "razor", MODEL, "--probe-len", "0", "-o", "r.kv.st"], "--probe-len"),
    # bench --rows and kvtool policy
    ("bench-rows-not-ours", ["bench", MODEL, *BENCH, *NLL, "--rows", "data.csv"], "line 1 is not a row"),
    ("bench-rows-dir", ["bench", MODEL, *BENCH, *NLL, "--rows", "adir"], "is a directory"),
    ("policy-empty", ["policy", "good.kv.st", ""], "the policy is empty"),
    ("policy-malformed", ["policy", "good.kv.st", "heads=all,k=5"], "'k': 5 bits"),
    ("policy-profile-garbage", ["policy", "garbage.kv.st"], "not a readable safetensors"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in BEFORE_LOAD], ids=[c[0] for c in BEFORE_LOAD])
def test_refused_before_the_model_loads(in_workdir, no_model_load, capsys, argv, needle):
    code = _run(*argv)
    cap = capsys.readouterr()
    _one_line_error(code, cap.out, cap.err, needle)


def test_emoji_codes_are_printed_as_written(in_workdir, no_model_load, capsys):
    code = _run("bench", MODEL, "--baselines", "streaming:-1:5", "--policies", "heads=all")
    err = capsys.readouterr().err
    assert code != 0 and "streaming:-1:5" in err and "\N{THUMBS DOWN SIGN}" not in err


# (id, argv, needle): known only once the model (or its tokenizer) is loaded, but refused before any forward pass
AFTER_LOAD = [
    ("run-prompt-too-long", ["run", MODEL, "--no-chat", "--prompt", "word " * 400], "context of 256"),
    ("run-prompt-plus-new-tokens", ["run", MODEL, "--no-chat", "--prompt", "hello", "--max-new-tokens", "300"],
     "context of 256"),
    ("run-vgroup-huge", ["run", MODEL, *NLL, "--policy", "heads=all,v=4,vgroup=100000"],
     "vgroup=100000 does not divide head_dim 8"),
    ("run-vgroup-not-divisor", ["run", MODEL, *NLL, "--policy", "heads=all,v=4,vgroup=3"], "head_dim 8"),
    ("policy-not-calibrated", ["policy", "good.kv.st", "heads=razor:0.5", "--model", MODEL], "razor"),
    ("profile-passkey-layout-too-short", ["profile", MODEL, "--seq-len", "24", "--sink", "2", "--recent", "8"],
     "too short for the passkey layout"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in AFTER_LOAD], ids=[c[0] for c in AFTER_LOAD])
def test_refused_after_load_before_any_forward(in_workdir, capsys, monkeypatch, argv, needle):
    import transformers

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran: this input must be refused before it")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", no_forward)
    monkeypatch.setattr(transformers.LlamaModel, "forward", no_forward)
    code = _run(*argv)
    cap = capsys.readouterr()
    _one_line_error(code, cap.out, cap.err, needle)


def test_samples_stream_in_constant_memory(workdir):
    """A million passkey samples: made in well under a second, one at a time, with memory for one sample."""
    from transformers import AutoTokenizer

    from kvtool.data import passkey_samples

    tok = AutoTokenizer.from_pretrained(workdir / MODEL)
    passkey_samples(tok, 1, 200, n_needles=1)                            # warm the haystack and tokenizer caches
    tracemalloc.start()
    start = time.perf_counter()
    stream = passkey_samples(tok, 1_000_000, 200, n_needles=1)
    first = [s.input_ids.numel() for _, s in zip(range(3), stream)]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(stream) == 1_000_000 and first == [200, 200, 200] and stream.length(999_999) == 200
    assert torch.equal(stream[2].input_ids, passkey_samples(tok, 3, 200, n_needles=1)[2].input_ids)
    assert seconds < 5 and peak < 64 * 2**20, (seconds, peak)
    with pytest.raises(KvtoolError, match="at most 1000000"):
        passkey_samples(tok, int(HUGE), 200)


def test_api_policy_and_profile_arguments(workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtool.cache import CompressedCache, prefill
    from kvtool.cli_run import generate

    model = AutoModelForCausalLM.from_pretrained(workdir / MODEL).eval()
    tok = AutoTokenizer.from_pretrained(workdir / MODEL)
    with pytest.raises(KvtoolError, match="policy must be a policy string"):
        CompressedCache(model, None, policy=5)
    with pytest.raises(KvtoolError, match="profile must be a kvtool Profile"):
        CompressedCache(model, 3.5)
    with pytest.raises(KvtoolError, match="does not exist"):
        CompressedCache(model, str(workdir / "missing.kv.st"))
    cache = CompressedCache(model, str(workdir / "good.kv.st"), "heads=0.5,k=4,v=4")   # a path is loaded
    assert int(cache.retrieval.sum()) == 2
    with pytest.raises(KvtoolError, match="at least one token"):
        prefill(model, torch.zeros(1, 0, dtype=torch.long), cache)
    with pytest.raises(KvtoolError, match="chunk must be at least 1"):
        prefill(model, torch.ones(1, 4, dtype=torch.long), cache, chunk=0)
    with pytest.raises(KvtoolError, match="gives no tokens"):
        generate(model, tok, None, "heads=all", "", 4, chat=False)
