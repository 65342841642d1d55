"""The command line: profile / inspect / merge on a tiny model saved to disk, and every bad input of the issue.

Each bad input must give one line `Error: ...` on stderr, a non-zero exit, no traceback and no file left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import cli_exit_code
from kvtool.models import load_model

FAST = ["--samples", "2", "--seq-len", "96", "--sink", "4", "--recent", "16", "--needles", "1"]


@pytest.fixture(scope="module")
def embedded_tokenizer():
    return load_model()[1]


def _save_tiny(path: Path, tokenizer, nan: bool = False, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    if nan:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.fill_(float("inf"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_tokenizer):
    return _save_tiny(tmp_path_factory.mktemp("tiny"), embedded_tokenizer)


def run(capsys, *args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = cli_exit_code(*args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, needle):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_profile_inspect_merge_roundtrip(capsys, tiny_dir, tmp_path):
    a, b, m = tmp_path / "a.kv.st", tmp_path / "b.kv.st", tmp_path / "m.kv.st"
    code, out, err = run(capsys, "profile", tiny_dir, *FAST, "--seed", "1", "-o", a, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == 2 and summary["kv_heads"] == 4 and a.is_file()
    assert run(capsys, "profile", tiny_dir, *FAST, "--seed", "2", "-o", b)[0] == 0
    code, out, err = run(capsys, "merge", a, b, "-o", m)
    assert code == 0, err
    assert "4 samples" in out and "seeds 1, 2" in out
    for twice in ([a, a], [a, tmp_path / "." / "a.kv.st"]):                  # the same file twice: refused
        code, _, err = run(capsys, "merge", *twice, "-o", tmp_path / "twice.kv.st")
        assert_one_line_error(code, err, "is given twice")
    c = tmp_path / "c.kv.st"
    c.write_bytes(a.read_bytes())                                             # a copy: the same samples again
    code, _, err = run(capsys, "merge", a, b, c, "-o", tmp_path / "twice.kv.st")
    assert_one_line_error(code, err, f"{c} has the same statistics as {a}")
    assert not (tmp_path / "twice.kv.st").exists()
    png = tmp_path / "heads.png"
    code, out, err = run(capsys, "inspect", m, "--plot", png, "--json")
    assert code == 0, err
    tables = json.loads(out)
    assert tables["calibration"]["samples"] == 4
    assert len(tables["retrieval_heads"]) == 4 and len(tables["layer_similarity"]) == 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, "inspect", m)
    assert code == 0 and "Most streaming-like KV heads" in out and "PCA" in out


@pytest.mark.parametrize("case", ["unknown_model", "unknown_hf_id", "missing_data", "unreadable_data", "too_long",
                                  "zero_samples", "not_writable", "output_is_dir", "short_data", "negative_sink",
                                  "not_an_int"])
def test_bad_input_is_one_line_error(capsys, tiny_dir, tmp_path, case):
    out = tmp_path / "x.kv.st"
    bad_bytes = tmp_path / "bad.txt"
    bad_bytes.write_bytes(b"\xff\xfe\xfa" * 100)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    args, needle = {
        "unknown_model": (["profile", tmp_path / "no-such-model", *FAST, "-o", out], "does not exist"),
        "unknown_hf_id": (["profile", "no-org/no-model", *FAST, "-o", out], "never downloads"),
        "negative_sink": (["profile", tiny_dir, *FAST, "--sink", "-1", "-o", out], "--sink must be at least 0"),
        "not_an_int": (["profile", tiny_dir, "--samples", "many", "-o", out], "--samples"),
        "missing_data": (["profile", tiny_dir, *FAST, "--data", tmp_path / "nope.txt", "-o", out], "nope.txt"),
        "unreadable_data": (["profile", tiny_dir, *FAST, "--data", bad_bytes, "-o", out], "bad.txt"),
        "too_long": (["profile", tiny_dir, "--seq-len", "4096", "-o", out], "context of 256"),
        "zero_samples": (["profile", tiny_dir, *FAST[2:], "--samples", "0", "-o", out], "zero samples"),
        "not_writable": (["profile", tiny_dir, *FAST, "-o", tmp_path / "missing-dir" / "x.kv.st"], "does not exist"),
        "output_is_dir": (["profile", tiny_dir, *FAST, "-o", tmp_path], "is a directory"),
        "short_data": (["profile", tiny_dir, *FAST, "--data", short, "-o", out], "short.txt"),
    }[case]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, needle)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("bad.txt", "short.txt")] == []


def test_nan_activations_leave_nothing_behind(capsys, tmp_path, embedded_tokenizer):
    model_dir = _save_tiny(tmp_path / "nan-model", embedded_tokenizer, nan=True)
    out = tmp_path / "out" / "x.kv.st"
    out.parent.mkdir()
    code, _, err = run(capsys, "profile", model_dir, *FAST, "-o", out)
    assert_one_line_error(code, err, "non-finite")
    assert list(out.parent.iterdir()) == []


def test_inspect_refuses_a_corrupt_profile(capsys, tiny_dir, tmp_path):
    good = tmp_path / "good.kv.st"
    code, out, err = run(capsys, "profile", tiny_dir, *FAST, "-o", good)
    assert code == 0, err
    from kvtool.profile import Profile

    values = "".join(line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3)
    assert "…" not in out and Profile.load(good).model["fingerprint"] in values     # folded at 80 columns, not cut
    bad = tmp_path / "bad.kv.st"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run(capsys, "inspect", bad)
    assert_one_line_error(code, err, "bad.kv.st")


def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "kvtool", "inspect", str(tmp_path / "none.kv.st")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_calibrate_commands(capsys, tiny_dir, tmp_path):
    prof = tmp_path / "p.kv.st"
    assert run(capsys, "profile", tiny_dir, *FAST, "-o", prof)[0] == 0
    code, out, err = run(capsys, "calibrate", "--method", "razor", tiny_dir, "--profile", prof, "--probe-len", "16",
                         "--retrieval-fraction", "0.25", "--json")
    assert code == 0, err
    assert json.loads(out)["retrieval_heads"] == 1 and json.loads(out)["output"] == str(prof)   # refined in place
    code, out, _ = run(capsys, "inspect", prof, "--json")
    assert json.loads(out)["methods"]["razor"]["retrieval_heads"] == 1
    # retrieval reuses the profile's passkey trace and says which data that was ...
    code, out, err = run(capsys, "calibrate", "--method", "retrieval", tiny_dir, "--profile", prof, "--json")
    assert code == 0, err
    assert "using the copy scores of" in err and "(2 samples of 96 tokens)" in err
    code, out, _ = run(capsys, "inspect", prof, "--json")
    assert code == 0 and "retrieval" in json.loads(out)["methods"]
    # ... while --samples / --seq-len trace new samples (a random model recalls none of the passkeys: one-line error)
    before = prof.read_bytes()
    code, _, err = run(capsys, "calibrate", "--method", "retrieval", tiny_dir, "--profile", prof, "--seq-len", "256")
    assert_one_line_error(code, err, "recalled none of the passkeys")
    assert prof.read_bytes() == before
    # a random model recalls no passkey: no copy score can exist, and it says so
    code, _, err = run(capsys, "calibrate", "--method", "retrieval", tiny_dir, "--samples", "2", "--seq-len", "256",
                       "-o", tmp_path / "r.kv.st")
    assert_one_line_error(code, err, "recalled none of the passkeys")
    assert not (tmp_path / "r.kv.st").exists()


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown calibration method 'nope'"),
    (["--method", "razor", "--retrieval-fraction", "1.5"], "must lie in [0, 1]"),
])
def test_calibrate_bad_input(capsys, tmp_path, args, needle):
    code, _, err = run(capsys, "calibrate", *args, "-o", tmp_path / "x.kv.st")
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["profile", "inspect", "merge", "calibrate", "run", "bench", "export", "policy"])
def test_help_shows_no_bool_metavar_and_every_option_has_help(command):
    """Flags show no `<bool>`, and every option says what it does (typer's rich help, 200 columns)."""
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "kvtool", command, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "--help" in proc.stdout
    from kvtool.cli import app
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    missing = [p.name for p in cmd.params if not getattr(p, "help", None)]
    assert missing == [], f"{command}: options without help text: {missing}"


def test_default_profile_name_is_not_the_shipped_one():
    from kvtool.cli import _default_output
    from kvtool.cli_run import SHIPPED

    assert _default_output(None) == Path("smollm2.kv.st") != Path(SHIPPED[None])
    assert _default_output(None, "razor") == Path("smollm2.razor.kv.st")
    assert _default_output("/models/Llama-3.1-8B/") == Path("llama-3.1-8b.kv.st")
    assert _default_output("x/model.Q4.gguf") == Path("model.q4.kv.st")
