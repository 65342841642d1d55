"""`kvtool run` and `kvtool bench` on a tiny model saved to disk: generate, side-by-side tasks, the plot, bad input."""

from __future__ import annotations

import json

import pytest

from kvtool.models import load_model
from test_cli import FAST, _save_tiny, assert_one_line_error, run


@pytest.fixture(scope="module")
def tiny_with_profile(tmp_path_factory):
    tok = load_model()[1]
    path = _save_tiny(tmp_path_factory.mktemp("tiny-run"), tok)
    prof = path / "tiny.kv.st"
    import sys

    argv, sys.argv = sys.argv, ["kvtool", "profile", str(path), *FAST, "-o", str(prof)]
    try:
        from kvtool.cli import main

        main()
    except SystemExit as exc:
        assert not exc.code
    finally:
        sys.argv = argv
    return path, prof


def test_run_prompt_prints_text_and_bytes(capsys, tiny_with_profile):
    model, prof = tiny_with_profile
    code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=0.5,k=4,v=4,sink=2,buffer=4",
                         "--prompt", "Hello there", "--max-new-tokens", "5", "--no-chat", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["new_tokens"] == 5 and result["tokens_seen"] == result["prompt_tokens"] + 4
    assert 0 < result["kv_bytes"] and result["full16_bytes"] > 0
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0                    # timed apart
    assert result["prefill_seconds"] + result["decode_seconds"] == pytest.approx(result["seconds"], abs=0.02)
    code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=0.5,k=4,v=4",
                         "--prompt", "Hello there", "--max-new-tokens", "3", "--no-chat")
    assert code == 0, err
    assert "prefill" in err and "decode 3 tokens at" in err
    assert "Nothing is saved yet" in err and "starts to shrink past 192 tokens" in err   # sink 64 + buffer 128


def test_run_task_nll_is_side_by_side(capsys, tiny_with_profile):
    model, prof = tiny_with_profile
    code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=none,sink=4,recent=16",
                         "--task", "nll", "--samples", "2", "--context", "96", "--continuation", "16", "--json")
    assert code == 0, err
    full, ours = json.loads(out)
    assert full["cache"] == "full" and ours["cache"] == "heads=none,sink=4,recent=16"
    assert full["x_smaller_than_16bit"] == 1.0 and ours["x_smaller_than_16bit"] > 3
    assert full["nll"] > 0 and ours["nll"] > 0 and ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0


def test_bench_passkey_table_and_plot(capsys, tiny_with_profile, tmp_path):
    model, prof = tiny_with_profile
    png = tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", model, "--profile", prof, "--task", "passkey", "--lengths", "96",
                         "--depths", "2", "--policies", "heads=all,k=4,v=4,buffer=8;heads=0.5",
                         "--baselines", "streaming:4:16", "--plot", png, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["cache"] for r in rows] == ["full", "streaming:4:16", "heads=all,k=4,v=4,buffer=8", "heads=0.5"]
    assert all(r["accuracy"].endswith("/2") for r in rows)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


@pytest.mark.parametrize("args,needle", [
    (["run", "--prompt", "hi", "--task", "nll"], "exactly one of"),
    (["run", "--task", "nll", "--policy", "heads=all,k=5"], "'k': 5 bits"),
    (["run", "--task", "summarise"], "unknown task"),
    (["run", "--prompt-file", "/no/such/file.txt"], "no such prompt file"),
    (["run", "--task", "nll", "--backend", "cupy"], "backend 'cupy'"),
    (["bench", "--task", "nll", "--baselines", "press:snapkv:0.5", "--policies", "heads=all"], "kvpress"),
    (["bench", "--task", "nll", "--baselines", "streaming:4", "--policies", "heads=all"], "streaming:<sink>:<recent>"),
    (["bench", "--lengths", "10,x"], "--lengths"),
])
def test_run_and_bench_bad_input(capsys, monkeypatch, tiny_with_profile, tmp_path, args, needle):
    import kvtool.cli_run

    monkeypatch.setattr(kvtool.cli_run, "_has_quanto", lambda: False)   # the same outcome with or without quanto
    model, prof = tiny_with_profile
    extra = ["--samples", "1", "--context", "64", "--continuation", "8"] if "nll" in args else []
    code, _, err = run(capsys, *args[:1], model, "--profile", prof, *args[1:], *extra)
    assert_one_line_error(code, err, needle)


def test_bench_plot_must_be_png(capsys, tiny_with_profile, tmp_path):
    model, prof = tiny_with_profile
    code, _, err = run(capsys, "bench", model, "--profile", prof, "--task", "nll", "--samples", "1", "--context", "64",
                       "--continuation", "8", "--policies", "heads=all", "--baselines", "none",
                       "--plot", tmp_path / "plot.svg")
    assert_one_line_error(code, err, ".png")
    assert not (tmp_path / "plot.svg").exists()


def test_bench_without_quanto_notes_it_after_validation(capsys, monkeypatch, tiny_with_profile):
    import kvtool.cli_run

    monkeypatch.setattr(kvtool.cli_run, "_has_quanto", lambda: False)
    model, prof = tiny_with_profile
    code, out, err = run(capsys, "bench", model, "--profile", prof, "--task", "nll", "--samples", "1", "--context",
                         "64", "--continuation", "8", "--decode-steps", "1", "--policies", "heads=all", "--json")
    assert code == 0, err
    assert "pip install 'kvtool[bench]'" in err                    # not eaten as rich markup
    assert [r["cache"] for r in json.loads(out)] == ["full", "streaming:4:252", "heads=all"]


@pytest.mark.parametrize("columns", ["80", "200"])
def test_table_keeps_long_policy_names_whole_when_piped(tiny_with_profile, columns):
    """Piped output is 80 columns wide (or $COLUMNS): policy names are never cut. Where they do not fit beside the
    numbers, rows are numbered and the full names follow under the table."""
    import os
    import subprocess
    import sys

    model, prof = tiny_with_profile
    pols = ["heads=all,k=4,v=4,buffer=8,sink=4,recent=16,kclip=0.995", "heads=all,k=4,v=4,buffer=8,sink=4,recent=16,kclip=0.99"]
    proc = subprocess.run([sys.executable, "-m", "kvtool", "bench", str(model), "--profile", str(prof), "--task", "nll",
                           "--samples", "1", "--context", "64", "--continuation", "8", "--decode-steps", "1",
                           "--baselines", "none", "--policies", ";".join(pols)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS=columns, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "…" not in proc.stdout and max(map(len, lines)) <= int(columns)
    first_column = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    if columns == "80":
        assert first_column == ["full", "#1", "#2"]
        assert lines[-2:] == [f"#1  {pols[0]}", f"#2  {pols[1]}"]
    else:
        assert first_column == ["full", *pols]


def test_text_source_is_used_and_recorded(capsys, monkeypatch, tiny_with_profile, tmp_path):
    """--text picks the NLL windows / the pass-key haystack; rows and the table title say which text it was."""
    model, prof = tiny_with_profile
    nll = ["--task", "nll", "--samples", "1", "--context", "64", "--continuation", "8", "--decode-steps", "1",
           "--baselines", "none", "--policies", "heads=all"]
    by_text = {}
    for text in ("pydoc", "stdlib"):
        code, out, err = run(capsys, "bench", model, "--profile", prof, *nll, "--text", text, "--json")
        assert code == 0, err
        rows = json.loads(out)
        assert [r["text"] for r in rows] == [text, text]
        by_text[text] = rows[0]["nll"]
    code, out, err = run(capsys, "bench", model, "--profile", prof, *nll, "--json")
    assert code == 0 and json.loads(out)[0]["text"] == "pydoc" and json.loads(out)[0]["nll"] == by_text["pydoc"]
    assert by_text["stdlib"] != by_text["pydoc"]                          # other windows, other NLL
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[own].txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=all", "--task", "passkey",
                         "--lengths", "96", "--depths", "1", "--text", "[own].txt")
    assert code == 0, err
    assert "heads=all on [own].txt (1 samples" in " ".join(out.split())    # the file name, printed as written
    code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=all", "--task", "passkey",
                         "--lengths", "96", "--depths", "1", "--json")
    assert code == 0 and {r["text"] for r in json.loads(out)} == {"filler"}


def test_run_warns_nothing(capsys, tiny_with_profile):
    """`kvtool run` (generate, and the nll task's forward passes on the full and the compressed cache) passes the cache
    under the keyword the installed transformers expects: its deprecation warning, made an error here, never fires
    (the CLI does not filter it)."""
    import warnings

    model, prof = tiny_with_profile
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=0.5,k=4,v=4,sink=2,buffer=4",
                             "--prompt", "Hello there", "--max-new-tokens", "3", "--no-chat", "--json")
        assert code == 0, err
        code, out, err = run(capsys, "run", model, "--profile", prof, "--policy", "heads=none,sink=4,recent=16",
                             "--task", "nll", "--samples", "1", "--context", "48", "--continuation", "8", "--json")
        assert code == 0, err
    assert "deprecated" not in err


def _record_nll_specs(monkeypatch) -> list:
    """The specs kvtool.evaluate.run_nll is called with, in order (it still runs)."""
    import kvtool.evaluate

    ran, real = [], kvtool.evaluate.run_nll
    monkeypatch.setattr(kvtool.evaluate, "run_nll", lambda mdl, s, spec, *a, **k: ran.append(spec) or real(mdl, s, spec, *a, **k))
    return ran


def test_bench_rows_file_resumes_and_keys_on_the_setup(capsys, monkeypatch, tiny_with_profile, tmp_path):
    """--rows appends each row as it finishes; a re-run reads rows of the same setup back instead of running them,
    and a changed setup (another seed) runs again. A file that is not ours is refused with one line."""
    model, prof = tiny_with_profile
    rows = tmp_path / "rows.jsonl"
    nll = ["--task", "nll", "--samples", "1", "--context", "64", "--continuation", "8", "--decode-steps", "1",
           "--baselines", "none", "--json", "--rows", rows]
    code, out, err = run(capsys, "bench", model, "--profile", prof, *nll, "--policies", "heads=all")
    assert code == 0, err
    first = json.loads(out)
    assert len(rows.read_text().splitlines()) == 2
    ran = _record_nll_specs(monkeypatch)
    code, out, err = run(capsys, "bench", model, "--profile", prof, *nll, "--policies", "heads=all;heads=none,sink=4,recent=16")
    assert code == 0, err
    again = json.loads(out)
    assert ran == ["heads=none,sink=4,recent=16"]                        # full and heads=all were read back
    assert again[:2] == first and len(rows.read_text().splitlines()) == 3
    code, out, err = run(capsys, "bench", model, "--profile", prof, *nll, "--policies", "heads=all", "--seed", "1")
    assert code == 0, err
    assert ran[1:] == ["full", "heads=all"] and len(rows.read_text().splitlines()) == 5
    # the setup names the profile by its tensors: a new default policy (metadata only) keeps the rows; new tensors do not
    from kvtool.profile import rows_fingerprint

    same = tmp_path / "same.kv.st"
    code, _, err = run(capsys, "policy", prof, "heads=all,k=4,v=4", "--model", model, "-o", same)
    assert code == 0, err
    assert same.read_bytes() != prof.read_bytes()
    assert rows_fingerprint(same)["profile_tensors_sha256"] == rows_fingerprint(prof)["profile_tensors_sha256"]
    assert rows_fingerprint(same)["profile_method"] == "all"
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(prof), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(prof))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    other = tmp_path / "other.kv.st"
    save_file(tensors, str(other), metadata=meta)
    assert rows_fingerprint(other)["profile_tensors_sha256"] != rows_fingerprint(prof)["profile_tensors_sha256"]
    # another profile: the full cache (a DynamicCache, no profile read) is read back, a kvtool policy runs again
    del ran[:]
    code, out, err = run(capsys, "bench", model, "--profile", other, *nll, "--policies", "heads=all")
    assert code == 0, err
    assert ran == ["heads=all"] and len(rows.read_text().splitlines()) == 6
    assert json.loads(out)[0] == first[0]
    bad = tmp_path / "notes.jsonl"
    bad.write_text("hello\n")
    code, _, err = run(capsys, "bench", model, "--profile", prof, *nll[:-1], bad, "--policies", "heads=all")
    assert_one_line_error(code, err, "line 1 is not a row")
    assert bad.read_text() == "hello\n"


def test_bench_runs_a_repeated_spec_once(capsys, monkeypatch, tiny_with_profile):
    """The full cache always leads a bench; naming it (or any spec) again in --policies does not run it twice."""
    model, prof = tiny_with_profile
    ran = _record_nll_specs(monkeypatch)
    code, out, err = run(capsys, "bench", model, "--profile", prof, "--task", "nll", "--samples", "1", "--context",
                         "64", "--continuation", "8", "--decode-steps", "1", "--baselines", "none", "--json",
                         "--policies", "full;heads=all;heads=all")
    assert code == 0, err
    assert ran == ["full", "heads=all"]
    assert [r["cache"] for r in json.loads(out)] == ["full", "heads=all"]


def test_policy_command_prints_sets_and_refuses(capsys, tiny_with_profile, tmp_path):
    """`kvtool policy P` prints the default policy; `kvtool policy P POLICY -o Q` checks it on the model and writes a
    profile whose default it is (so `kvtool run` without --policy uses it); a policy the profile cannot serve is one
    Error line and nothing written."""
    model, prof = tiny_with_profile
    code, out, err = run(capsys, "policy", prof, "--json")
    assert code == 0, err
    before = json.loads(out)["policy"]
    new = tmp_path / "four.kv.st"
    code, out, err = run(capsys, "policy", prof, "heads=all,k=4,v=4,krope=pre", "--model", model, "-o", new, "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "heads=all,k=4,v=4,krope=pre"
    code, out, err = run(capsys, "policy", new)
    assert code == 0 and out.strip() == "heads=all,k=4,v=4,krope=pre"
    code, out, err = run(capsys, "policy", prof, "--json")
    assert json.loads(out)["policy"] == before                                 # -o left the input alone
    code, out, err = run(capsys, "run", model, "--profile", new, "--prompt", "Hello there", "--max-new-tokens", "2",
                         "--no-chat", "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "heads=all,k=4,v=4,krope=pre"
    data = new.read_bytes()
    code, _, err = run(capsys, "policy", new, "heads=razor:0.5", "--model", model)
    assert_one_line_error(code, err, "razor")
    assert new.read_bytes() == data
