"""calibrate/pca.py end to end on a tiny random model: the lowrank section's shapes, latent ranges that are the real
extremes of the projected keys and values, the traced spectrum's discarded mass as the reconstruction error on the
same data, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from calibrate.pca import PCA
from conftest import tiny_model
from kvtool.api import calibrate, profile_model
from kvtool.data import text_file_samples
from kvtool.errors import KvtoolError
from kvtool.lowrank import FIELDS, LowRank, choose_rank, discarded_mass, project, reconstruct
from kvtool.profile import Profile
from kvtool.trace import TraceConfig
from test_pod import ByteTokenizer, text_file  # noqa: F401 (fixture)

T = 100


def _keys_values(model, samples):
    """Pre-RoPE keys and values of every layer, recomputed from the hidden states: [L] of ([H, N, D], [H, N, D])."""
    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    out = [([], []) for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for s in samples:
            hs = model(s.input_ids.view(1, -1), output_hidden_states=True).hidden_states
            for l, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(hs[l])[0]                          # [T, hidden]
                out[l][0].append(layer.self_attn.k_proj(x).view(-1, H, D).transpose(0, 1))
                out[l][1].append(layer.self_attn.v_proj(x).view(-1, H, D).transpose(0, 1))
    return [(torch.cat(k, 1), torch.cat(v, 1)) for k, v in out]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = tmp_path_factory.mktemp("pca") / "calib.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{i}" for i in torch.randint(0, 40, (2000,), generator=g).tolist()))
    model, tok = tiny_model("gqa"), ByteTokenizer()
    samples = text_file_samples(str(path), tok, T, 3)
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    out = calibrate(model, tok, "pca", profile=prof,
                    options={"samples": 3, "seq_len": T, "data": str(path), "max_points": 10_000})
    return model, samples, prof, out


def test_section_shapes_and_provenance(calibrated):
    model, _, prof, out = calibrated
    L, H, D = 3, 2, 16
    for name in ("key", "value"):
        for f in FIELDS:
            t = out[f"lowrank.{name}.{f}"]
            assert t.dtype == torch.float32 and t.shape == ((L, H, D, D) if f == "basis" else (L, H, D)), (name, f)
    torch.testing.assert_close(out["lowrank.key.basis"], prof["pca.key_pre.basis"])
    torch.testing.assert_close(out["lowrank.value.eigvals"], prof["pca.value.eigvals"])
    # the pass ran on the traced samples, so the latent's power per coordinate is the traced spectrum
    for name in ("key", "value"):
        torch.testing.assert_close(out[f"lowrank.{name}.power"], out[f"lowrank.{name}.eigvals"], rtol=1e-3, atol=1e-4)
    rec = out.calibration["methods"]["pca"]
    assert rec["samples"] == 3 and rec["clip"] == 0.999 and rec["points"] == 3 * T
    assert rec["source"] == {"key": "pca.key_pre", "value": "pca.value"}


def test_latent_ranges_are_the_projected_extremes(calibrated):
    model, samples, _, out = calibrated
    for layer, (k, v) in enumerate(_keys_values(model, samples)):
        for name, x in (("key", k), ("value", v)):
            lr = LowRank.from_tensors(out.tensors, name)
            z = project(x, lr.mean[layer][:, None, :], lr.basis[layer], x.shape[-1])   # [H, N, D]
            torch.testing.assert_close(lr.lo[layer], z.amin(1), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lr.hi[layer], z.amax(1), rtol=1e-4, atol=1e-4)
            assert (lr.lo[layer] <= lr.qlo[layer] + 1e-6).all() and (lr.qlo[layer] < lr.qhi[layer]).all()
            assert (lr.qhi[layer] <= lr.hi[layer] + 1e-6).all()
            qs = torch.quantile(z, torch.tensor([0.001, 0.999]), dim=1)       # every point was kept (300 < max)
            torch.testing.assert_close(lr.qlo[layer], qs[0], rtol=1e-4, atol=1e-4)


def test_reconstruction_error_is_the_discarded_mass_on_the_traced_data(calibrated):
    model, samples, _, out = calibrated
    kv = _keys_values(model, samples)
    for name, idx in (("key", 0), ("value", 1)):
        lr = LowRank.from_tensors(out.tensors, name)
        ranks = choose_rank(lr.eigvals, "auto:0.9", per="head")
        for layer in range(3):
            x = kv[layer][idx].double()
            for h in range(2):
                r = int(ranks[layer, h])
                m, b = lr.mean[layer, h].double(), lr.basis[layer, h].double()
                err = (reconstruct(project(x[h], m, b, r), m, b) - x[h]).square().sum(-1).mean()
                assert err.item() == pytest.approx(discarded_mass(lr.eigvals[layer, h], r).item(), rel=1e-3, abs=1e-5)
                assert err.item() <= 0.1 * x[h].sub(m).square().sum(-1).mean().item() + 1e-6   # ≥ 90% energy kept


def test_round_trip_through_a_file(calibrated, tmp_path):
    model, _, _, out = calibrated
    again = Profile.load(out.save(tmp_path / "p.kv.st"), model=model)
    torch.testing.assert_close(again["lowrank.key.qhi"], out["lowrank.key.qhi"])
    assert "pca.key_pre.basis" in again and "heads.retrieval_score" in again


def test_bad_input_is_one_line(calibrated, text_file):  # noqa: F811
    model, _, prof, _ = calibrated
    cases = [({"clip": 0.3}, None, "--clip must be a quantile level in (0.5, 1]"),
             ({"samples": 0}, None, "--samples must be at least 1"),
             ({}, "none", "pca needs a profile's traced PCA"),
             ({}, "no-pca", "profile has no traced pca.key_pre"),
             ({"seq_len": 10_000, "data": text_file}, "ok", "beyond the model's context of 512 tokens")]
    for options, which, message in cases:
        profile = None if which == "none" else prof
        if which == "no-pca":
            profile = Profile({k: v for k, v in prof.tensors.items() if not k.startswith("pca.key_pre")},
                              prof.model, prof.calibration, prof.policy)
        with pytest.raises(KvtoolError) as exc:
            calibrate(model, ByteTokenizer(), "pca", profile=profile, options=options)
        assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    with pytest.raises(KvtoolError, match="does not apply to pca"):
        calibrate(model, ByteTokenizer(), "pca", profile=prof, fraction=0.5)
    with pytest.raises(KvtoolError, match="--clip"):
        PCA(clip=1.5)


def test_inspect_lists_the_ranks_and_draws_a_panel(calibrated, tmp_path):
    from kvtool.inspect import plot, summarize

    _, _, _, out = calibrated
    rows = summarize(out)["lowrank"]
    assert [r["tensor"] for r in rows] == ["key (pre-RoPE)", "value"]
    for r, name in zip(rows, ("key", "value")):
        ranks = choose_rank(out[f"lowrank.{name}.eigvals"], "auto:0.99")[:, 0]
        assert r["rank@0.99 max"] == int(ranks.max()) and r["rank@0.99 mean"] == round(ranks.float().mean().item(), 1)
        assert r["rank@0.9 mean"] <= r["rank@0.99 mean"] <= 16
    assert plot(out, tmp_path / "p.png").stat().st_size > 0
    summary = PCA.summary(out)
    assert summary["key rank@0.99"] == {"mean": rows[0]["rank@0.99 mean"], "max": rows[0]["rank@0.99 max"]}
