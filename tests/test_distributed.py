"""Sharded profiling on torch.distributed: `torchrun --nproc-per-node 2 -m kvtool profile|calibrate` (gloo on the
CPU) writes the profile a single process writes of the same samples, with world_size 2 in its calibration record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_exit_code
from kvtool.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--samples", "5", "--seq-len", "96", "--sink", "4", "--recent", "16", "--needles", "1"]


def torchrun(*args, cwd, nproc: int = 2):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "kvtool", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)
    return proc


def assert_same_profile(one: Profile, two: Profile) -> None:
    assert set(one.tensors) == set(two.tensors)
    for name, a in one.tensors.items():
        b = two.tensors[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.is_floating_point():                   # float64 sums: equal up to summation order
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
        else:                                       # counts, histograms: exact
            assert torch.equal(a, b), name


def test_torchrun_profile_on_two_gloo_processes_equals_one_process(tmp_path):
    from test_cli import _save_tiny
    from kvtool.models import load_model

    tiny = _save_tiny(tmp_path / "tiny", load_model()[1])
    proc = torchrun("profile", tiny, *FAST, "-o", "two.kv.st", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)                         # rank 0 alone prints the summary ...
    assert summary["world_size"] == 2 and summary["samples"] == 5
    assert proc.stderr.count("Traced 5 samples") == 1         # ... and the progress / result lines
    assert cli_exit_code("profile", tiny, *FAST, "-o", tmp_path / "one.kv.st") == 0
    one, two = Profile.load(tmp_path / "one.kv.st"), Profile.load(tmp_path / "two.kv.st")
    assert_same_profile(one, two)
    assert (one.calibration["world_size"], two.calibration["world_size"]) == (1, 2)
    assert one.calibration["samples"] == two.calibration["samples"] == 5
    assert one.calibration["lengths"] == two.calibration["lengths"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.kv.st", "tiny", "two.kv.st"]   # rank 1 wrote nothing


def test_torchrun_retrieval_calibration_traces_shards(tmp_path):
    """The retrieval method traces new passkey samples (the embedded model recalls them); 2 ranks = 1 process."""
    args = ["calibrate", "--method", "retrieval", "--samples", "2", "--seq-len", "256", "--retrieval-fraction", "0.25"]
    proc = torchrun(*args, "-o", "two.kv.st", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_exit_code(*args, "-o", tmp_path / "one.kv.st") == 0
    one, two = Profile.load(tmp_path / "one.kv.st"), Profile.load(tmp_path / "two.kv.st")
    torch.testing.assert_close(two["heads.retrieval.score"], one["heads.retrieval.score"], rtol=1e-6, atol=1e-7)
    assert torch.equal(two["heads.retrieval.mask"], one["heads.retrieval.mask"])
    assert two.calibration["methods"]["retrieval"]["world_size"] == 2
    assert one.calibration["methods"]["retrieval"]["world_size"] == 1


def test_a_method_that_cannot_shard_is_refused_under_torchrun(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")                    # what torchrun sets; refused before any model loads
    code = cli_exit_code("calibrate", "--method", "razor", "-o", tmp_path / "x.kv.st")
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Error: calibrate --method razor runs in one process") and "retrieval" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_shards_cover_every_sample_once():
    from kvtool.distributed import Shard

    samples = list(range(7))
    parts = [list(Shard(samples, r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for x in p) == samples and len(Shard(samples, 1, 3)) == 2
