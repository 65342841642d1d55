"""Python API: profiles of shards merge into the profile of all the data; length checks."""

from __future__ import annotations

import pytest
import torch

import kvtool
from conftest import needle_sample, tiny_model
from kvtool.api import check_lengths, merge_profiles, profile_model
from kvtool.errors import KvtoolError
from kvtool.profile import Profile
from kvtool.trace import TraceConfig

CFG = TraceConfig(sink=4, recent=16, query_samples=12, window=8, recall_threshold=-1.0)


def test_profile_of_shards_merges_into_profile_of_all(tmp_path):
    model = tiny_model("gqa")
    samples = [needle_sample(T=72 + 8 * i, seed=i) for i in range(5)]
    whole = profile_model(model, samples, config=CFG, data={"kind": "test"})
    a = profile_model(model, samples[:2], config=CFG, data={"kind": "test"})
    b = profile_model(model, samples[2:], config=CFG, data={"kind": "test"})
    a, b = Profile.load(a.save(tmp_path / "a.kv.st")), Profile.load(b.save(tmp_path / "b.kv.st"))
    merged = merge_profiles(a, b)
    assert set(merged.tensors) == set(whole.tensors)
    for name, t in whole.tensors.items():
        m = merged.tensors[name]
        if not t.is_floating_point():
            assert torch.equal(m, t), name                                   # counts and histograms: exact
        else:
            torch.testing.assert_close(m, t, rtol=1e-6, atol=1e-6, msg=name)  # float64 sums in another order
    assert merged.calibration["samples"] == 5 and merged.calibration["lengths"] == whole.calibration["lengths"]


def test_merge_refuses_other_models_and_settings():
    samples = [needle_sample(T=72)]
    a = profile_model(tiny_model("gqa", seed=0), samples, config=CFG)
    b = profile_model(tiny_model("gqa", seed=1), samples, config=CFG)
    with pytest.raises(KvtoolError, match="different models"):
        merge_profiles(a, b)
    c = profile_model(tiny_model("gqa", seed=0), samples, config=TraceConfig(sink=2, recent=16, query_samples=12))
    with pytest.raises(KvtoolError, match="different settings"):
        merge_profiles(a, c)
    slim = profile_model(tiny_model("gqa", seed=0), samples, config=CFG, keep_stats=False)
    with pytest.raises(KvtoolError, match="no raw statistics"):
        merge_profiles(a, slim)


def test_length_checks():
    model = tiny_model("gqa")
    with pytest.raises(KvtoolError, match="beyond the model's context of 512"):
        check_lengths(model, 513, CFG)
    with pytest.raises(KvtoolError, match="must exceed sink \\+ recent"):
        check_lengths(model, 20, CFG)
    with pytest.raises(KvtoolError, match="zero samples"):
        profile_model(model, [], config=CFG)


def test_public_api_names():
    for name in ("load_model", "Profile", "load_samples", "passkey_samples", "profile_model", "merge_profiles",
                 "TraceConfig", "summarize", "KvtoolError"):
        assert getattr(kvtool, name) is not None
