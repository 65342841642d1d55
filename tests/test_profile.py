"""The .kv.st file: round trip, atomic writes, and refusal of truncated, corrupted, foreign or malformed profiles."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import needle_sample, tiny_model
from kvtool.api import profile_model
from kvtool.errors import KvtoolError
from kvtool.profile import Profile, model_fingerprint
from kvtool.trace import TraceConfig

CFG = TraceConfig(sink=4, recent=16, query_samples=8, window=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gqa")


@pytest.fixture(scope="module")
def prof(model):
    return profile_model(model, [needle_sample(T=64)], config=CFG, data={"kind": "test"})


def test_round_trip_is_bit_exact(prof, model, tmp_path):
    path = prof.save(tmp_path / "p.kv.st")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask      # an ordinary file, not mkstemp's 0600
    back = Profile.load(path, model=model)
    assert set(back.tensors) == set(prof.tensors)
    for name, t in prof.tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert back.model == prof.model and back.calibration == prof.calibration and back.policy == prof.policy
    assert back.format_version == "1" and set(back.section("heads")) >= {"copy_score", "streaming_mass"}


def test_failed_write_leaves_old_file_and_no_temp(prof, tmp_path):
    path = prof.save(tmp_path / "p.kv.st")
    before = path.read_bytes()
    bad = Profile(dict(prof.tensors), prof.model, prof.calibration)
    bad.tensors["heads.sink_mass"] = torch.full_like(prof["heads.sink_mass"], float("nan"))
    with pytest.raises(KvtoolError, match="heads.sink_mass contains NaN"):
        bad.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.kv.st"]
    with pytest.raises(KvtoolError, match="does not exist"):
        prof.save(tmp_path / "missing" / "p.kv.st")


@pytest.mark.parametrize("cut", [0, 7, 100, 0.5, -1])
def test_truncated_file_is_refused(prof, tmp_path, cut):
    data = prof.save(tmp_path / "p.kv.st").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    bad = tmp_path / "bad.kv.st"
    bad.write_bytes(data[:n])
    with pytest.raises(KvtoolError, match="bad.kv.st"):
        Profile.load(bad)


def test_corrupted_header_is_refused(prof, tmp_path):
    data = bytearray(prof.save(tmp_path / "p.kv.st").read_bytes())
    data[8:24] = b"\x00\xff" * 8          # garbage in the JSON header
    bad = tmp_path / "bad.kv.st"
    bad.write_bytes(bytes(data))
    with pytest.raises(KvtoolError, match="truncated or corrupted"):
        Profile.load(bad)


def _rewrite(prof, path, meta_change=None, tensor_change=None):
    meta = {"kvtool.format_version": "1", "kvtool.model": json.dumps(prof.model),
            "kvtool.calibration": json.dumps(prof.calibration), "kvtool.policy": "{}"}
    meta.update(meta_change or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    tensors = {k: v.contiguous() for k, v in prof.tensors.items()}
    tensors.update(tensor_change or {})
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("change,message", [
    ({"kvtool.format_version": "2"}, "format version 2 is not supported"),
    ({"kvtool.format_version": None}, "not a kvtool profile"),
    ({"kvtool.model": "{not json"}, "kvtool.model metadata is not valid JSON"),
    ({"kvtool.calibration": None}, "kvtool.calibration metadata is missing"),
])
def test_bad_metadata_is_refused(prof, tmp_path, change, message):
    with pytest.raises(KvtoolError, match=message):
        Profile.load(_rewrite(prof, tmp_path / "x.kv.st", meta_change=change))


@pytest.mark.parametrize("name,shape", [("heads.retrieval_score", (3, 3)), ("channels.value.max", (3, 2, 15)),
                                        ("layers.similarity", (7, 2)), ("pca.key_pre.basis", (3, 2, 16, 4))])
def test_wrong_shapes_are_refused(prof, tmp_path, name, shape):
    with pytest.raises(KvtoolError, match=name.replace(".", "\\.")):
        Profile.load(_rewrite(prof, tmp_path / "x.kv.st", tensor_change={name: torch.zeros(shape)}))


def test_profile_for_another_model_is_refused(prof, tmp_path):
    path = prof.save(tmp_path / "p.kv.st")
    with pytest.raises(KvtoolError, match="different model \\(fingerprint"):
        Profile.load(path, model=tiny_model("gqa", seed=1))
    with pytest.raises(KvtoolError,
                       match="LlamaForCausalLM: 3 layers, 4 query / 2 KV heads of 16\\), not \\(LlamaForCausalLM: 2 layers"):
        Profile.load(path, model=tiny_model("gqa", layers=2))
    with pytest.raises(KvtoolError, match="num_kv_heads"):
        Profile.load(path, model=tiny_model("mha"))


def test_fingerprint_survives_save_and_reload(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model_fingerprint(again) == model_fingerprint(model)
    with torch.no_grad():
        again.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(again) != model_fingerprint(model)


def test_loaded_profile_survives_the_file_being_rewritten_in_place(prof, tmp_path):
    """A loaded profile owns its tensors: overwriting the file in place (same inode, as `cp` does) must not change
    them. (safetensors maps the file; tensors still pointing into the map changed under a running benchmark.)"""
    import shutil

    a, b = tmp_path / "a.kv.st", tmp_path / "b.kv.st"
    prof.save(a)
    other = Profile(dict(prof.tensors), prof.model, prof.calibration, prof.policy)
    other.tensors = {("aaa." + k if k.startswith("heads.") else k): v + 1 if v.is_floating_point() else v
                     for k, v in prof.tensors.items()}
    other.save(b)
    loaded = Profile.load(a)
    before = {k: v.clone() for k, v in loaded.tensors.items()}
    with open(b, "rb") as src, open(a, "r+b") as dst:                   # rewrite a in place, keeping its inode
        shutil.copyfileobj(src, dst)
        dst.truncate()
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
