"""`kvtool export`: vLLM FP8 KV scales (compressed-tensors names and kv_cache_scheme) and DuoAttention / kvpress head
patterns, read back the way those engines read them; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import cli_exit_code, needle_sample, tiny_model
from kvtool.api import calibrate, profile_model
from kvtool.trace import TraceConfig

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "smollm2-135m-instruct.kv.st"
CFG = TraceConfig(sink=4, recent=16, query_samples=8, window=8)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """A traced tiny GQA model (3 layers, 2 KV heads, D 16) calibrated with the retrieval method, saved."""
    model = tiny_model("gqa")
    prof = profile_model(model, [needle_sample(T=64, seed=s) for s in range(2)], config=CFG, data={"kind": "passkey"})
    prof = calibrate(model, None, "retrieval", profile=prof, fraction=0.5)
    path = tmp_path_factory.mktemp("export") / "tiny.kv.st"
    prof.save(path)
    return path, prof


def run(capsys, *args):
    code = cli_exit_code(*args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), err
    assert needle in lines[0], err


def duo_load(directory: Path):
    """What DuoAttention's duo_attn.utils.load_attn_pattern and kvpress's DuoAttentionPress do with the files."""
    heads = np.clip(np.loadtxt(directory / "full_attention_heads.tsv", dtype=float, delimiter="\t"), 0, 1)
    config = json.loads((directory / "config.json").read_text())
    return heads, config["sink_size"], config["recent_size"]


@pytest.mark.parametrize("per_head", [False, True])
def test_vllm_scales_have_compressed_tensors_names_shapes_and_values(capsys, tiny_profile, tmp_path, per_head):
    path, prof = tiny_profile
    out = tmp_path / "vllm"
    code, _, err = run(capsys, "export", path, "--format", "vllm", "-o", out, *(["--per-head"] if per_head else []))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["kv_cache_scheme.json", "kv_scales.safetensors"]
    L, H = prof.model["num_layers"], prof.model["num_kv_heads"]
    with safe_open(str(out / "kv_scales.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == {f"model.layers.{i}.self_attn.{s}" for i in range(L) for s in ("k_scale", "v_scale")}
        assert json.loads(f.metadata()["kvtool.export"])["fingerprint"] == prof.model["fingerprint"]
        for i in range(L):
            for kind, s in (("key_post", "k_scale"), ("value", "v_scale")):
                t = f.get_tensor(f"model.layers.{i}.self_attn.{s}")
                assert t.dtype == torch.float32 and tuple(t.shape) == ((H,) if per_head else (1,))
                absmax = prof[f"channels.{kind}.absmax"][i]                      # [H, D]
                expect = absmax.amax(-1) if per_head else absmax.amax().reshape(1)
                torch.testing.assert_close(t, expect / 448.0)
                # the calibrated range maps onto e4m3's whole range and no further
                assert torch.allclose(expect / t, torch.full_like(t, torch.finfo(torch.float8_e4m3fn).max))
    scheme = json.loads((out / "kv_cache_scheme.json").read_text())["quantization_config"]
    assert scheme["quant_method"] == "compressed-tensors"
    assert scheme["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "strategy": "attn_head" if per_head
                                         else "tensor", "dynamic": False, "symmetric": True}


def test_vllm_prefix_names_other_layouts(capsys, tiny_profile, tmp_path):
    path, prof = tiny_profile
    out = tmp_path / "v"
    code, _, err = run(capsys, "export", path, "-f", "vllm", "-o", out, "--prefix", "transformer.h.{layer}.attn")
    assert code == 0, err
    with safe_open(str(out / "kv_scales.safetensors"), framework="pt") as f:
        assert "transformer.h.2.attn.v_scale" in set(f.keys())


def test_duo_export_of_real_gates_reads_back_as_duoattention_reads_it(capsys, tmp_path):
    out = tmp_path / "pattern"
    code, _, err = run(capsys, "export", SHIPPED, "--format", "duo", "-o", out)
    assert code == 0, err
    heads, sink, recent = duo_load(out)
    with safe_open(str(SHIPPED), framework="pt") as f:
        gate = f.get_tensor("heads.duo.gate").double().numpy()                   # [L, H_kv] = [30, 3]
        calib = json.loads(f.metadata()["kvtool.calibration"])
    assert heads.shape == gate.shape == (30, 3)
    np.testing.assert_allclose(heads, gate, atol=1e-9)
    deploy = calib["methods"]["duo"]["windows"]["deploy"]
    assert (sink, recent) == (deploy["sink"], deploy["recent"])
    # kvpress's DuoAttentionPress: the head_compression_ratio · L·H lowest scores become streaming heads
    n_pruned = round(heads.size * 0.5)
    streaming = np.zeros(heads.shape, bool)
    streaming[np.unravel_index(np.argsort(heads, axis=None)[:n_pruned], heads.shape)] = True
    assert streaming.sum() == n_pruned and not streaming[np.unravel_index(heads.argmax(), heads.shape)]


def test_duo_binary_mask_and_window_overrides(capsys, tiny_profile, tmp_path):
    path, prof = tiny_profile
    out = tmp_path / "mask"
    code, _, err = run(capsys, "export", path, "-f", "duo", "--heads", "retrieval", "--binary", "--sink", "8",
                       "--recent", "32", "-o", out)
    assert code == 0, err
    heads, sink, recent = duo_load(out)
    assert heads.shape == (3, 2) and (sink, recent) == (8, 32)
    np.testing.assert_array_equal(heads, prof["heads.retrieval.mask"].double().numpy())
    assert set(np.unique(heads)) <= {0.0, 1.0} and heads.sum() == 3                 # fraction 0.5 of 6 heads
    code, _, err = run(capsys, "export", path, "-f", "duo", "-o", tmp_path / "score")   # policy's method: retrieval
    assert code == 0, err
    np.testing.assert_allclose(duo_load(tmp_path / "score")[0], prof["heads.retrieval.score"].double().numpy(),
                               atol=1e-9)


def test_export_over_an_existing_directory_replaces_only_its_files(capsys, tiny_profile, tmp_path):
    path, _ = tiny_profile
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "config.json").write_text("old")
    code, _, err = run(capsys, "export", path, "-f", "duo", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "full_attention_heads.tsv", "keep.txt"]
    assert json.loads((out / "config.json").read_text())["sink_size"] == 64


@pytest.mark.parametrize("case", ["no_section", "no_heads", "unknown_format", "missing_dir", "output_is_file",
                                  "read_only", "under_a_file", "score_out_of_range", "wrong_format_flag", "missing_profile",
                                  "negative_sink", "bad_prefix"])
def test_bad_export_input_is_one_line_and_writes_nothing(capsys, tiny_profile, tmp_path, case):
    path, prof = tiny_profile
    from kvtool.profile import Profile

    bare = tmp_path / "bare.kv.st"                   # a profile without channel ranges nor head scores
    Profile({k: v for k, v in prof.tensors.items() if k.startswith("layers.")}, prof.model, prof.calibration,
            prof.policy).save(bare)
    wide = tmp_path / "wide.kv.st"                   # a head score outside [0, 1]
    tensors = dict(prof.tensors)
    tensors["heads.razor.score"] = torch.full_like(prof["heads.retrieval.score"], 3.0)
    Profile(tensors, prof.model, prof.calibration, prof.policy).save(wide)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    args, needle = {
        "no_section": (["-f", "vllm", bare, "-o", out], "no channels.key_post.absmax"),
        "no_heads": (["-f", "duo", bare, "-o", out], "holds no head scores"),
        "unknown_format": (["-f", "trtllm", path, "-o", out], "unknown export format 'trtllm'"),
        "missing_dir": (["-f", "duo", path, "-o", tmp_path / "nope" / "out"], "does not exist"),
        "output_is_file": (["-f", "duo", path, "-o", tmp_path / "file"], "is a file"),
        "read_only": (["-f", "vllm", path, "-o", ro / "out"], "not writable"),
        "under_a_file": (["-f", "vllm", path, "-o", tmp_path / "file" / "out"], "is not a directory"),
        "score_out_of_range": (["-f", "duo", wide, "--heads", "razor", "-o", out], "--binary"),
        "wrong_format_flag": (["-f", "vllm", path, "--binary", "-o", out], "duo only"),
        "missing_profile": (["-f", "duo", tmp_path / "none.kv.st", "-o", out], "does not exist"),
        "negative_sink": (["-f", "duo", path, "--sink", "-1", "-o", out], "--sink"),
        "bad_prefix": (["-f", "vllm", path, "--prefix", "model.attn", "-o", out], "{layer}"),
    }[case]
    import os

    if case == "read_only" and os.access(ro, os.W_OK):
        pytest.skip("running as a user who can write into a read-only directory")
    code, _, err = run(capsys, "export", *args)
    one_line_error(code, err, needle)
    assert not out.exists() and list(ro.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.kv.st", "file", "ro", "wide.kv.st"]


@pytest.mark.parametrize("exists", [False, True])
def test_a_failed_write_leaves_no_file_of_the_export(tiny_profile, tmp_path, monkeypatch, exists):
    """The second file fails to write (a full disk): the first one must not appear either, and no temporary file
    stays behind."""
    from kvtool import fileio
    from kvtool.errors import KvtoolError
    from kvtool.export import export

    _, prof = tiny_profile
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    real, calls = fileio._write_synced, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(fileio, "_write_synced", flaky)
    with pytest.raises(KvtoolError, match="no space left on device"):
        export(prof, "vllm", out)
    assert len(calls) == 2
    assert (list(out.iterdir()) == []) if exists else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if exists else [])
