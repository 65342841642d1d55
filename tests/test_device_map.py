"""`--device-map` (accelerate) for profile, calibrate and run, on the CPU: a tiny model split between "cpu" and
"disk" (offloaded weights stay on the meta device and accelerate's hooks load them when a layer runs) gives the
profile, fingerprint, calibration and NLL of the model loaded whole."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_exit_code
from kvtool.profile import Profile

FAST = ["--samples", "2", "--seq-len", "96", "--sink", "4", "--recent", "16", "--needles", "1"]
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_cli import _save_tiny
    from kvtool.models import load_model

    return _save_tiny(tmp_path_factory.mktemp("tiny"), load_model()[1])


@pytest.fixture
def split_map(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(SPLIT))
    return path


def run(capsys, *args):
    code = cli_exit_code(*args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_the_split_model_really_is_offloaded_and_its_hooks_run(tiny_dir):
    from kvtool.models import input_device, load_model
    from kvtool.profile import model_fingerprint

    whole, _ = load_model(tiny_dir)
    split, _ = load_model(tiny_dir, device_map=SPLIT)
    assert split.hf_device_map == SPLIT
    q = split.model.layers[1].self_attn.q_proj
    assert q.weight.device.type == "meta" and q._hf_hook.offload                  # on disk, loaded by its hook
    assert split.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert input_device(split) == torch.device("cpu")
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, whole(ids).logits)
    assert q.weight.device.type == "meta"                                         # released again after the layer ran
    assert model_fingerprint(split) == model_fingerprint(whole)                   # offloaded weights are read back


def test_profile_calibrate_and_run_with_a_device_map_equal_the_whole_model(capsys, tiny_dir, split_map, tmp_path):
    whole, split = tmp_path / "whole.kv.st", tmp_path / "split.kv.st"
    assert run(capsys, "profile", tiny_dir, *FAST, "-o", whole)[0] == 0
    code, _, err = run(capsys, "profile", tiny_dir, *FAST, "-o", split, "--device-map", split_map)
    assert code == 0, err
    a, b = Profile.load(whole), Profile.load(split)
    assert a.model["fingerprint"] == b.model["fingerprint"]
    assert set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    for path, extra in ((whole, []), (split, ["--device-map", str(split_map)])):
        code, _, err = run(capsys, "calibrate", "--method", "razor", tiny_dir, "--profile", path, "--probe-len", "16",
                           *extra)
        assert code == 0, err
    assert torch.equal(Profile.load(whole)["heads.razor.score"], Profile.load(split)["heads.razor.score"])
    rows = []
    for extra in ([], ["--device-map", str(split_map)], ["--device-map", "auto"]):
        code, out, err = run(capsys, "run", tiny_dir, "--task", "nll", "--samples", "1", "--context", "64",
                             "--continuation", "8", "--chunk", "16", "--policy", "heads=none,sink=4,recent=16",
                             "--json", *extra)
        assert code == 0, err
        rows.append([(r["cache"], r["nll"], r["kv_MiB"]) for r in json.loads(out)])
    assert rows[0] == rows[1] == rows[2]


def test_auto_map_with_a_small_memory_cap_offloads_everything_and_still_profiles(tiny_dir):
    """accelerate's "auto" on a CPU-only machine: with the CPU capped below the model, every weight goes to disk."""
    from conftest import needle_sample
    from kvtool.api import profile_model
    from kvtool.models import load_model
    from kvtool.trace import TraceConfig

    whole, _ = load_model(tiny_dir)
    disk, _ = load_model(tiny_dir, device_map="auto", max_memory={"cpu": "7MB"})
    assert set(disk.hf_device_map.values()) == {"disk"}
    cfg = TraceConfig(sink=4, recent=16, query_samples=8, window=8)
    a = profile_model(whole, [needle_sample(T=64)], config=cfg)
    b = profile_model(disk, [needle_sample(T=64)], config=cfg)
    assert a.model["fingerprint"] == b.model["fingerprint"]
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("args,needle", [
    (["--device-map", "everywhere"], "give auto, balanced"),
    (["--max-memory", "cpu=1GiB"], "--max-memory applies with --device-map only"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "DEVICE=SIZE"),
])
def test_bad_device_map_options_are_one_line(capsys, tiny_dir, tmp_path, args, needle):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model.layers.0": "moon"}')
    for command in (["profile", tiny_dir, *FAST, "-o", tmp_path / "x.kv.st"],
                    ["run", tiny_dir, "--prompt", "hi"]):
        code, _, err = run(capsys, *command, *args)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err
    code, _, err = run(capsys, "profile", tiny_dir, *FAST, "-o", tmp_path / "x.kv.st", "--device-map", bad)
    assert code == 1 and "expected an object" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_device_map_under_torchrun_profiles_on_two_gloo_ranks(tiny_dir, split_map, tmp_path):
    """Both at once: 2 ranks share the samples, and each rank runs its copy of the model split between cpu and disk
    (on GPUs, each rank takes its own share of them: kvtool.distributed.rank_gpus)."""
    from test_distributed import assert_same_profile, torchrun

    proc = torchrun("profile", tiny_dir, *FAST, "-o", "split2.kv.st", "--device-map", split_map, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_exit_code("profile", tiny_dir, *FAST, "-o", tmp_path / "whole.kv.st") == 0
    two, whole = Profile.load(tmp_path / "split2.kv.st"), Profile.load(tmp_path / "whole.kv.st")
    assert two.calibration["world_size"] == 2 and two.model["fingerprint"] == whole.model["fingerprint"]
    assert_same_profile(whole, two)
