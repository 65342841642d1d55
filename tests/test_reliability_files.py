"""Bad files, interrupted writes and signals, through the command line (docs/reliability.md, "Files, profiles,
checkpoints and signals").

Every case asserts what the user sees — a non-zero exit, exactly one line on stderr starting with `Error:`, no
traceback — and that nothing on disk changed: the directory holds the same files with the same bytes before and
after (an existing `-o` target included), and no temporary file is left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from conftest import cli_exit_code
from test_cli import FAST, _save_tiny, run

import kvtool.models as models
from kvtool.errors import KvtoolError
from kvtool.fileio import atomic_write, sweep_stale
from kvtool.models import load_model

ROOT = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(code, err: str, needle: str = "") -> str:
    assert code != 0, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], err
    return lines[0]


def late_error(code, err: str, needle: str = "") -> str:
    """A failure after the work (while saving): the progress lines printed before it stay, then one `Error:` line."""
    assert code != 0, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error")] == lines[-1:], err
    assert "Traceback" not in err and needle in lines[-1], err
    return lines[-1]


def edit_profile(src: Path, dst: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """Copy a profile with metadata records or tensors replaced (written with plain safetensors, as an editor would)."""
    with safe_open(str(src), framework="pt") as fh:
        m = dict(fh.metadata())
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    m.update(meta or {})
    t.update(tensors or {})
    save_file(t, str(dst), metadata=m)
    return dst


def model_record(path: Path, **changes) -> str:
    with safe_open(str(path), framework="pt") as fh:
        record = json.loads(fh.metadata()["kvtool.model"])
    record.update(changes)
    return json.dumps(record)


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    return _save_tiny(tmp_path_factory.mktemp("tiny"), tok)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny):
    """A profile of `tiny` with raw statistics (mergeable)."""
    path = tmp_path_factory.mktemp("good") / "good.kv.st"
    code = cli_exit_code("profile", tiny, *FAST, "-o", path)
    assert code == 0 and path.is_file()
    return path


# -- profiles ------------------------------------------------------------------------------------------------------
def _bad_profiles(good: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected text in the error)."""
    data = good.read_bytes()
    cases = {}
    (d / "truncated.kv.st").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d / "truncated.kv.st", "not a readable safetensors profile")
    (d / "random.kv.st").write_bytes(os.urandom(4096))
    cases["random bytes"] = (d / "random.kv.st", "not a readable safetensors profile")
    (d / "empty.kv.st").write_bytes(b"")
    cases["empty"] = (d / "empty.kv.st", "not a readable safetensors profile")
    save_file({"weight": torch.zeros(3)}, str(d / "foreign.kv.st"), metadata={"format": "pt"})
    cases["foreign safetensors"] = (d / "foreign.kv.st", "not a kvtool profile")
    edits = {
        "bad JSON": ({"kvtool.model": "{not json"}, "not valid JSON"),
        "model not an object": ({"kvtool.model": "[1, 2]"}, "must be a JSON object"),
        "num_layers a string": ({"kvtool.model": model_record(good, num_layers="2")}, "num_layers"),
        "head_dim zero": ({"kvtool.model": model_record(good, head_dim=0)}, "head_dim"),
        "name a number": ({"kvtool.model": model_record(good, name=5)}, "kvtool.model.name"),
        "data a list": ({"kvtool.calibration": json.dumps({"data": [1], "samples": 2, "lengths": [96],
                                                           "methods": {}})}, "kvtool.calibration.data"),
        "samples negative": ({"kvtool.calibration": json.dumps({"samples": -1, "lengths": []})}, "samples"),
        "deeply nested": ({"kvtool.policy": "[" * 5000 + "]" * 5000}, "JSON"),
        "nested 20 levels": ({"kvtool.policy": json.dumps({"a": json.loads("[" * 20 + "]" * 20)})}, "nested"),
        "policy value an object": ({"kvtool.policy": json.dumps({"heads": {"x": 1}})}, "kvtool.policy.heads"),
        "format version 2": ({"kvtool.format_version": "2"}, "format version 2"),
    }
    for i, (name, (meta, needle)) in enumerate(edits.items()):
        cases[name] = (edit_profile(good, d / f"meta{i}.kv.st", meta=meta), needle)
    with safe_open(str(good), framework="pt") as fh:
        q = fh.get_tensor("channels.key_post.quantiles")                        # [L, H, D, Q]
        ret = fh.get_tensor("heads.copy_score")
        lo = fh.get_tensor("stats.key_post.lo")
    tensor_edits = {
        "wrong quantile count": ({"channels.key_post.quantiles": q[..., :-1].contiguous()}, "expected [2, 2, 8,"),
        "wrong head count": ({"heads.copy_score": torch.zeros(2, 3)}, "heads.copy_score has shape"),
        "NaN tensor": ({"heads.copy_score": torch.full_like(ret, float("nan"))}, "contains NaN"),
        "NaN statistic": ({"stats.key_post.lo": torch.full_like(lo, float("nan"))}, "stats.key_post.lo contains NaN"),
    }
    for i, (name, (tensors, needle)) in enumerate(tensor_edits.items()):
        cases[name] = (edit_profile(good, d / f"tensor{i}.kv.st", tensors=tensors), needle)
    return cases


def test_bad_profiles_are_refused_by_inspect_and_merge(capsys, good, tmp_path):
    cases = _bad_profiles(good, tmp_path)
    target = tmp_path / "merged.kv.st"
    target.write_bytes(b"an older merge result")                 # must survive every failed merge byte for byte
    before = snapshot(tmp_path)
    for name, (path, needle) in cases.items():
        code, out, err = run(capsys, "inspect", path)
        line = one_line_error(code, err, needle)
        assert path.name in line, (name, line)
        code, _, err = run(capsys, "merge", good, path, "-o", target)
        one_line_error(code, err, needle)
    assert snapshot(tmp_path) == before


def test_nan_statistics_are_not_merged(capsys, good, tmp_path):
    with safe_open(str(good), framework="pt") as fh:
        hist = fh.get_tensor("stats.key_post.lo")
    bad = edit_profile(good, tmp_path / "nan.kv.st", tensors={"stats.key_post.lo": torch.full_like(hist, float("nan"))})
    code, _, err = run(capsys, "merge", good, bad, "-o", tmp_path / "m.kv.st")
    one_line_error(code, err, "contains NaN")
    assert not (tmp_path / "m.kv.st").exists()


@pytest.mark.parametrize("key,value", [("stats.key_post_moments.s", torch.zeros(2, 2, 7, dtype=torch.float64)),
                                       ("stats.value.hist", torch.zeros(2, 2, 8, 600, dtype=torch.int16)),
                                       ("stats.value.hist", torch.zeros(2, 2, 8, 3))])
def test_raw_statistics_of_the_wrong_shape_are_not_merged(capsys, good, tmp_path, key, value):
    bad = edit_profile(good, tmp_path / "bad.kv.st", tensors={key: value})
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "merge", good, bad, "-o", tmp_path / "m.kv.st")
    one_line_error(code, err, key)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["[/]oops", "[blink red]flash[/blink red]", "\x1b[31mred\x1b[0m\x07", ":-1: emoji"])
def test_markup_and_escapes_from_a_profile_are_printed_as_text(capsys, monkeypatch, good, tmp_path, name):
    import kvtool.cli

    monkeypatch.setattr(kvtool.cli.out, "width", 1000)               # the header on one line
    path = edit_profile(good, tmp_path / "named.kv.st", meta={"kvtool.model": model_record(good, name=name),
                                                              "kvtool.calibration": _calibration(good, kind=name)})
    code, out, err = run(capsys, "inspect", path)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    header = out.splitlines()[0]
    visible = name.replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    assert visible in header and header.count(visible) == 2, header      # name and data kind, literally


def _calibration(path: Path, **data) -> str:
    with safe_open(str(path), framework="pt") as fh:
        record = json.loads(fh.metadata()["kvtool.calibration"])
    record["data"] = {**record["data"], **data}
    return json.dumps(record)


def test_a_profile_of_another_model_is_refused(capsys, good, tmp_path, tok):
    other = _save_tiny(tmp_path / "other-model", tok, seed=1)          # same shapes, other weights
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "calibrate", "--method", "razor", other, "--profile", good, "--probe-len", "16",
                       "-o", tmp_path / "out.kv.st")
    one_line_error(code, err, "different model")
    assert snapshot(tmp_path) == before


# -- outputs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dir missing", "parent is a file", "output is a directory"])
def test_unwritable_outputs(capsys, tiny, good, tmp_path, case):
    (tmp_path / "afile").write_text("x")
    out = {"dir missing": tmp_path / "no" / "x.kv.st", "parent is a file": tmp_path / "afile" / "x.kv.st",
           "output is a directory": tmp_path}[case]
    before = snapshot(tmp_path)
    for args in (["profile", tiny, *FAST, "-o", out], ["calibrate", "--method", "razor", tiny, "--profile", good,
                                                       "-o", out]):
        code, _, err = run(capsys, *args)
        one_line_error(code, err, str(out))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("failure", ["ENOSPC", "SafetensorError"])
def test_disk_full_on_save_keeps_the_old_file(capsys, monkeypatch, tiny, tmp_path, failure):
    """The writer fails half-way (a full disk) or safetensors raises its own error: one line, old bytes kept."""
    import safetensors.torch

    import kvtool.profile

    target = tmp_path / "p.kv.st"
    target.write_bytes(b"the previous profile")
    if failure == "ENOSPC":
        def writer(data):
            def write(tmp):
                with open(tmp, "wb") as fh:
                    fh.write(data[:1000])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write
        monkeypatch.setattr(kvtool.profile, "write_bytes", writer)
        needle = "no space left on device"
    else:
        from safetensors import SafetensorError

        def broken(*a, **k):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        monkeypatch.setattr(safetensors.torch, "save", broken)
        needle = "Error while serializing"
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "profile", tiny, *FAST, "-o", target)
    late_error(code, err, needle)
    assert snapshot(tmp_path) == before


def test_atomic_write_turns_any_writer_error_into_one_line(tmp_path):
    from safetensors import SafetensorError

    def fail(exc):
        def write(tmp):
            Path(tmp).write_bytes(b"half")
            raise exc
        return write

    for exc, needle in ((OSError(errno.ENOSPC, "No space left on device"), "no space left"),
                        (SafetensorError("header too large"), "header too large"), (RuntimeError(), "RuntimeError")):
        with pytest.raises(KvtoolError, match=needle):
            atomic_write(tmp_path / "x.bin", fail(exc))
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):                    # a signal passes through, the temporary file does not
        atomic_write(tmp_path / "x.bin", fail(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_stale_temporaries_of_ours(tmp_path):
    dead = tmp_path / f".x.kv.st.kvtool-{_dead_pid()}-0123abcd.tmp"
    alive = tmp_path / f".x.kv.st.kvtool-{os.getppid()}-0123abcd.tmp"          # a live process's write in progress
    mine = tmp_path / f".x.kv.st.kvtool-{os.getpid()}-0123abcd.tmp"
    foreign = tmp_path / ".x.kv.st.abcd1234.tmp"                                 # not our naming: never touched
    for p in (dead, alive, mine, foreign):
        p.write_bytes(b"x")
    assert sweep_stale(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, mine, foreign))


def _child_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return env


_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import kvtool.profile
    def slow(data):
        def write(tmp):
            with open(tmp, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                print("writing", tmp, flush=True)
                time.sleep(120)
        return write
    kvtool.profile.write_bytes = slow
    from kvtool.cli import main
    sys.argv = ["kvtool"] + sys.argv[1:]
    main()
""")


@pytest.mark.parametrize("sig,code,message", [(signal.SIGTERM, 143, "Error: terminated (SIGTERM)"),
                                              (signal.SIGINT, 130, "Error: interrupted"),
                                              (signal.SIGKILL, -9, None)])
def test_signal_mid_write(capsys, tiny, tmp_path, sig, code, message):
    """A signal while the profile is being written: the old target stays; SIGTERM/Ctrl-C remove the temporary
    file and exit 143/130 with one line; after SIGKILL the next run sweeps it."""
    target = tmp_path / "p.kv.st"
    target.write_bytes(b"the previous profile")
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "profile", str(tiny), *FAST, "-o", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("writing "), (line, proc.stderr.read() if proc.poll() is not None else "")
        tmp = Path(line.split(" ", 1)[1].strip())
        assert tmp.parent == tmp_path and tmp.exists() and f".kvtool-{proc.pid}-" in tmp.name
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    if message is not None:
        assert late_error(proc.returncode, err) == message
        assert snapshot(tmp_path) == before
        return
    assert tmp.exists()                                                  # SIGKILL: nothing could clean up
    code, _, err = run(capsys, "profile", tiny, *FAST, "-o", tmp_path / "next.kv.st")
    assert code == 0, err
    assert not tmp.exists() and target.read_bytes() == b"the previous profile"


def test_ctrl_c_in_process_exits_130(capsys, monkeypatch, tiny, tmp_path):
    import kvtool.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(kvtool.api, "profile_model", interrupted)
    code, _, err = run(capsys, "profile", tiny, *FAST, "-o", tmp_path / "p.kv.st")
    assert code == 130 and one_line_error(code, err) == "Error: interrupted"
    assert list(tmp_path.iterdir()) == []


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:                                 # another file system
        dst.write_bytes(src.read_bytes())


# -- the model conversion cache and model files --------------------------------------------------------------------
@pytest.fixture()
def cache_copy(tmp_path, monkeypatch, tok):
    """A private KVTOOL_CACHE holding a hard-linked copy (never write through it: unlink first) of the embedded
    model's converted entry, and a fake
    converter that refills an entry from it (the real conversion is exercised by every first load)."""
    gguf = models.embedded_gguf_path()
    source = models.models_dir() / f"{gguf.stem}-{models._entry_key(models.gguf_sha256(gguf))}"
    assert models._complete(source)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVTOOL_CACHE", str(cache))
    calls = []

    def fake_convert(gguf_path, target, digest):
        calls.append(target)
        target.mkdir(parents=True)
        for f in source.iterdir():
            _link_or_copy(f, target / f.name)
    entry = models.models_dir() / source.name
    fake_convert(gguf, entry, None)
    calls.clear()
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    return entry, calls


@pytest.mark.parametrize("damage", ["truncated weights", "no marker", "garbage config"])
def test_a_damaged_cache_entry_is_converted_again(capsys, cache_copy, damage):
    entry, calls = cache_copy
    if damage == "truncated weights":
        data = (entry / "model.safetensors").read_bytes()[: 1 << 20]
        (entry / "model.safetensors").unlink()                               # unlink first: it is a hard link
        (entry / "model.safetensors").write_bytes(data)
    elif damage == "no marker":
        (entry / models._MARKER).unlink()
    else:
        (entry / "config.json").unlink()
        (entry / "config.json").write_text("{}")
        marker = json.loads((entry / models._MARKER).read_text())
        marker["files"]["config.json"] = 2
        (entry / models._MARKER).unlink()                                        # a hard link too
        (entry / models._MARKER).write_text(json.dumps(marker))
    model, _ = load_model()
    assert calls == [entry] and models._complete(entry)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1 and "converting" in notes[0] and "Traceback" not in err
    assert model.config.num_hidden_layers == 30


def test_cache_command_lists_and_clears(capsys, cache_copy):
    entry, _ = cache_copy
    stale = entry.parent / f".convert-{_dead_pid()}-abcdefgh"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    code, out, err = run(capsys, "cache", "--json")
    assert code == 0, err
    listing = json.loads(out)
    kinds = {Path(r["path"]).name: r["kind"] for r in listing["entries"]}
    assert kinds == {entry.name: "converted model", stale.name: "stale temporary"}
    assert listing["total_bytes"] == sum(r["bytes"] for r in listing["entries"]) > 500_000_000
    code, out, _ = run(capsys, "cache")
    assert code == 0 and entry.name in out and "total" in out
    code, out, _ = run(capsys, "cache", "--clear", "--json")
    assert code == 0 and json.loads(out)["removed_entries"] == 2
    assert list(entry.parent.iterdir()) == []
    assert json.loads(run(capsys, "cache", "--json")[1])["entries"] == []


def test_a_killed_conversion_is_swept(cache_copy):
    entry, _ = cache_copy
    stale = entry.parent / f".convert-{_dead_pid()}-abcdefgh"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    load_model()
    assert not stale.exists() and entry.exists()


def test_content_addressed_cache_shares_one_entry_across_paths(tmp_path, cache_copy):
    entry, _ = cache_copy
    gguf = models.embedded_gguf_path()
    copy = tmp_path / "elsewhere" / gguf.name
    copy.parent.mkdir()
    _link_or_copy(gguf, copy)
    assert models.gguf_sha256(copy) == models.gguf_sha256(gguf)
    index = json.loads((models.cache_dir() / models._HASHES).read_text())
    assert {str(gguf.resolve()), str(copy.resolve())} <= set(index)
    load_model(copy)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


@pytest.mark.parametrize("content,needle", [(b"", "is empty"), (b"GGUF", "too short"),
                                            (b"\x00" * 4096, "not a GGUF file"),
                                            (b"GGUF" + bytes(range(256)) * 8, "cannot read GGUF file")])
def test_bad_gguf_files(capsys, tmp_path, monkeypatch, content, needle):
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "m.gguf").write_bytes(content)
    before = snapshot(work)
    code, _, err = run(capsys, "profile", work / "m.gguf", *FAST, "-o", work / "x.kv.st")
    one_line_error(code, err, needle)
    assert snapshot(work) == before
    assert not (tmp_path / "cache" / "models").exists() or list((tmp_path / "cache" / "models").iterdir()) == []


def test_unwritable_cache_fails_before_converting(capsys, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted into an unwritable cache"))
    code, _, err = run(capsys, "profile", *FAST, "-o", tmp_path / "x.kv.st")
    one_line_error(code, err, "set KVTOOL_CACHE to a writable directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_truncated_model_directory(capsys, tiny, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "profile", broken, *FAST, "-o", tmp_path / "x.kv.st")
    one_line_error(code, err, "cannot load model")
    assert snapshot(tmp_path) == before


# -- duo checkpoints -----------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory, tok):
    """A tiny model with a context long enough for the duo 'cpu' preset (512..1024-token samples)."""
    path = tmp_path_factory.mktemp("long-tiny")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1100,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_duo_resume_refuses_a_pickle_and_bad_fields(capsys, long_tiny, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"step": 1, "config": {}, "payload": _Payload(str(marker))}, evil)
    negative = tmp_path / "negative.ckpt"
    save_file({"gates": torch.ones(2, 2), "history": torch.zeros(0, 2, dtype=torch.float64)}, str(negative),
              metadata={"kvtool.duo_checkpoint": "2", "step": "-5", "config": "{}"})
    cases = {evil: "not a kvtool duo checkpoint", negative: "step must be an integer in [0, 4]",
             tmp_path / "missing.ckpt": "does not exist", tmp_path: "is a directory"}
    before = snapshot(tmp_path)
    for ckpt, needle in cases.items():
        code, _, err = run(capsys, "calibrate", "--method", "duo", long_tiny, "--preset", "cpu", "--steps", "4",
                           "--checkpoint", ckpt, "--resume", "-o", tmp_path / "out.kv.st")
        one_line_error(code, err, needle)
    assert not marker.exists()                                          # the pickle's payload never ran
    assert snapshot(tmp_path) == before
