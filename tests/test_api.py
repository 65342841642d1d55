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
    samples = [needle_sample(T=96, seed=i) for i in range(5)]
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
    assert merged.calibration["seeds"] == [42, 42] and "seed" not in merged.calibration


def test_merge_refuses_double_counting_other_lengths_and_nan(tmp_path):
    model = tiny_model("gqa")
    a = profile_model(model, [needle_sample(T=96, seed=0)], config=CFG, seed=1)
    b = profile_model(model, [needle_sample(T=96, seed=1)], config=CFG, seed=2)
    with pytest.raises(KvtoolError, match="same statistics as profile 1"):
        merge_profiles(a, b, a)
    copy = Profile.load(a.save(tmp_path / "a.kv.st"))                        # the same file under another name
    with pytest.raises(KvtoolError, match="b.kv.st has the same statistics as a.kv.st"):
        merge_profiles(a, copy, names=["a.kv.st", "b.kv.st"])
    longer = profile_model(model, [needle_sample(T=120, seed=2)], config=CFG)
    with pytest.raises(KvtoolError, match="different sequence lengths: profile 2 has samples of 120 tokens"):
        merge_profiles(a, longer)
    nan = Profile(dict(b.tensors), b.model, b.calibration, b.policy)
    key = next(k for k, t in nan.tensors.items() if k.startswith("stats.") and t.is_floating_point())
    nan.tensors[key] = nan.tensors[key].clone().fill_(float("nan"))
    with pytest.raises(KvtoolError, match=f"raw statistic {key} contains NaN"):
        merge_profiles(a, nan)
    merged = merge_profiles(a, b)
    assert merged.calibration["seeds"] == [1, 2] and merged.calibration["samples"] == 2
    assert merge_profiles(merged, profile_model(model, [needle_sample(T=96, seed=3)], config=CFG, seed=3)) \
        .calibration["seeds"] == [1, 2, 3]


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
    """Each public name (most are imported lazily) is the object its module defines, and every name in __all__
    resolves; an unknown name is an AttributeError."""
    import importlib

    where = {"load_model": "kvtool.models", "Profile": "kvtool.profile", "load_samples": "kvtool.data",
             "passkey_samples": "kvtool.data", "profile_model": "kvtool.api", "merge_profiles": "kvtool.api",
             "TraceConfig": "kvtool.trace", "summarize": "kvtool.inspect", "KvtoolError": "kvtool.errors",
             "CompressedCache": "kvtool.cache", "with_cache": "kvtool.cache", "calibrate": "kvtool.api"}
    for name, module in where.items():
        assert getattr(kvtool, name) is getattr(importlib.import_module(module), name), name
    assert set(where) <= set(kvtool.__all__)
    for name in kvtool.__all__:
        getattr(kvtool, name)
    with pytest.raises(AttributeError):
        kvtool.no_such_name
