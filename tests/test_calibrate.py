"""Head-classification methods: razor finds a planted echo head and matches a naive computation; selection rules;
calibrate refines a profile in place; bad input is refused with one line."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import calibrate
from calibrate.heads import top_count, top_fraction
from calibrate.razor import Razor
from conftest import needle_sample, tiny_model
from kvtool.api import calibrate as run_calibration
from kvtool.api import profile_model
from kvtool.errors import KvtoolError
from kvtool.profile import Profile
from kvtool.trace import TraceConfig
from test_trace import naive_trace


def planted_echo_model(vocab: int = 64, low: int = 5):
    """Layer 0, query head 0 / KV head 0 attends to earlier copies of its own token.

    Every token embedding is a unit vector in the first 10 hidden dims; head 0's q and k copy those dims into the
    `low` lowest-frequency RoPE pairs (rope_theta 1e8: they barely rotate over a few hundred positions), so
    q_i·k_j is large exactly when tokens i and j are equal.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e8})
    model = LlamaForCausalLM(cfg).eval()
    d, half = 16, 8
    dims = [half - 1 - i for i in range(low)] + [d - 1 - i for i in range(low)]   # rotate_half pairs (i, i+8)
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(vocab, 2 * low), dim=-1)
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : 2 * low] = u
        attn = model.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight[:d].zero_()                                            # head 0 of q, KV head 0 of k
            for j, dim in enumerate(dims):
                proj.weight[dim, j] = 2.0
    return model


def test_razor_finds_a_planted_echo_head():
    model = planted_echo_model()
    result = Razor(probe_len=40, repeats=4, query_samples=0).run(model)
    echo = result.tensors["echo"]
    assert echo.argmax().item() == 0 and echo[0, 0] > 0.5                    # (layer 0, KV head 0)
    others = echo.flatten()[1:]
    assert others.max() < 0.2
    assert result.tensors["mask"][0, 0] == 1


def test_razor_scores_match_naive_attention():
    model = tiny_model("gqa")
    razor = Razor(probe_len=24, repeats=3, query_samples=0, chunk=5)
    result = razor.run(model)
    ids, offset, n = razor.probe(model)
    records, _ = naive_trace(model, type("S", (), {"input_ids": ids})())
    for r in records:
        A = r["attn"]                                                          # [H_q, T, T]
        echo, ind = torch.zeros(A.shape[0]), torch.zeros(A.shape[0])
        queries = range(offset + n, ids.numel())
        for i in queries:
            for k in range(1, (i - offset) // n + 1):
                echo += A[:, i, i - k * n]
                ind += A[:, i, i - k * n + 1]
        G = model.config.num_attention_heads // model.config.num_key_value_heads
        torch.testing.assert_close(result.tensors["echo"][r["layer"]], (echo / len(queries)).view(-1, G).amax(-1),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(result.tensors["induction"][r["layer"]], (ind / len(queries)).view(-1, G).amax(-1),
                                   atol=1e-5, rtol=0)


def test_top_fraction_is_a_deterministic_global_quantile():
    scores = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.5, 0.0]])
    assert top_fraction(scores, 0.5).tolist() == [[1, 1, 1], [0, 0, 0]]      # ties: earlier (layer, head) first
    assert top_fraction(scores, 0.34).tolist() == [[1, 1, 0], [0, 0, 0]]
    assert top_fraction(scores, 0.0).sum() == 0 and top_fraction(scores, 1.0).sum() == 6
    assert top_count(scores, 0.01).sum() == 1                                 # rounded up: at least one head
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(KvtoolError, match="retrieval-fraction must lie in"):
            top_fraction(scores, bad)


def test_calibrate_refines_a_profile_and_records_provenance(tmp_path):
    model = tiny_model("gqa")
    base = profile_model(model, [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16, query_samples=8))
    path = base.save(tmp_path / "p.kv.st")
    prof = run_calibration(model, None, "razor", profile=Profile.load(path, model=model), fraction=0.5,
                           options={"probe_len": 16, "repeats": 3})
    prof.save(path)                                                            # refine in place
    back = Profile.load(path, model=model)
    assert set(base.tensors) < set(back.tensors)
    assert {"heads.razor.score", "heads.razor.mask", "heads.razor.echo", "heads.razor.induction"} <= set(back.tensors)
    assert back["heads.razor.mask"].sum() == 3 and back.policy == {"policy": "heads=razor:0.5"}
    assert back.calibration["methods"]["razor"]["probe_len"] == 16 and "trace" in back.calibration["methods"]
    with pytest.raises(KvtoolError, match="different model"):
        run_calibration(tiny_model("gqa", seed=3), None, "razor", profile=back)


def test_bad_method_inputs():
    with pytest.raises(KvtoolError, match="unknown calibration method 'nope'"):
        calibrate.get("nope")
    assert {"razor", "retrieval"} <= set(calibrate.names())
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(KvtoolError, match="does not understand MambaForCausalLM"):
        run_calibration(mamba, None, "razor", options={"probe_len": 16})
    with pytest.raises(KvtoolError, match="bad option for --method razor"):
        run_calibration(tiny_model("gqa"), None, "razor", options={"bogus": 1})
    with pytest.raises(KvtoolError, match="probe too short"):
        run_calibration(tiny_model("gqa"), None, "razor", options={"probe_len": 4})
