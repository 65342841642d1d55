"""kvtool.sharing and calibrate/pod.py: greedy layer groups, the log-sum-exp merge, least-squares key maps, and the
method end to end on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from calibrate.pod import PoD
from conftest import VOCAB, identical_keys_model, needle_sample, tiny_model
from kvtool.api import calibrate, profile_model
from kvtool.errors import KvtoolError
from kvtool.profile import Profile
from kvtool.sharing import fit_maps, group_ids, group_layers, parse_groups, sliding_layers, spans
from kvtool.stores.base import merge, partial
from kvtool.trace import TraceConfig


class ByteTokenizer:
    """Enough of a tokenizer for kvtool.data.text_file_samples: bytes modulo the tiny vocabulary, no BOS."""

    bos_token_id = None
    eos_token = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b % VOCAB for b in text.encode()]}


@pytest.fixture()
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "key", "value", "layer", "head", "token", "cache"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path / "calib.txt"
    path.write_text(text)
    return str(path)


# -- grouping ---------------------------------------------------------------------------------------------------------
SIM = torch.tensor([0.9, 0.8, 0.2, 0.6, 0.55, 0.7, 0.1])                 # 8 layers: similarity of l and l+1


def test_greedy_groups_follow_the_threshold():
    assert spans(group_layers(SIM, 0.5)) == [(0, 2), (3, 6), (7, 7)]
    assert spans(group_layers(SIM, 0.65)) == [(0, 2), (3, 3), (4, 4), (5, 6), (7, 7)]
    assert spans(group_layers(SIM, 0.0)) == [(0, 7)]
    assert spans(group_layers(SIM, 1.0)) == [(i, i) for i in range(8)]
    assert group_layers(SIM, 0.5).tolist() == [0, 0, 0, 3, 3, 3, 3, 7]
    assert group_ids(group_layers(SIM, 0.5)).tolist() == [0, 0, 0, 1, 1, 1, 1, 2]


def test_max_group_splits_long_runs():
    assert spans(group_layers(SIM, 0.5, max_group=2)) == [(0, 1), (2, 2), (3, 4), (5, 6), (7, 7)]
    assert spans(group_layers(SIM, 0.0, max_group=3)) == [(0, 2), (3, 5), (6, 7)]
    assert spans(group_layers(SIM, 0.0, max_group=1)) == [(i, i) for i in range(8)]


def test_sliding_layers_stand_alone():
    excluded = sliding_layers(["full_attention", "sliding_attention"] * 4)
    assert excluded == {1, 3, 5, 7}
    assert spans(group_layers(SIM, 0.0, excluded={4})) == [(0, 3), (4, 4), (5, 7)]
    assert spans(group_layers(SIM, 0.0, excluded=excluded)) == [(i, i) for i in range(8)]


def test_per_head_grouping_is_column_wise():
    sim = torch.stack([SIM, 1 - SIM], -1)                                  # [7, 2]
    leader = group_layers(sim, 0.5)
    assert leader.shape == (8, 2)
    assert leader[:, 0].tolist() == group_layers(SIM, 0.5).tolist()
    assert spans(leader[:, 1]) == [(0, 0), (1, 1), (2, 3), (4, 4), (5, 5), (6, 7)]


def test_explicit_groups_and_their_errors():
    assert parse_groups("3-5, 6-7", 8).tolist() == [0, 1, 2, 3, 3, 3, 6, 6]
    for text, message in (("2-9", "is not a range of layers 0..7"), ("1-3,3-4", "overlaps another group"),
                          ("a-b", "is not a layer range"), ("4-6", "spans sliding-window layer 5")):
        with pytest.raises(KvtoolError, match=message) as exc:
            parse_groups(text, 8, excluded={5})
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(KvtoolError, match=r"--threshold must lie in \[0, 1\]"):
        group_layers(SIM, bad)
    with pytest.raises(KvtoolError, match=r"--threshold must lie in \[0, 1\]"):
        PoD(threshold=bad)


# -- the log-sum-exp merge -------------------------------------------------------------------------------------------
def test_merge_of_a_split_equals_full_attention():
    g = torch.Generator().manual_seed(0)
    B, H, t, S, D = 2, 3, 5, 40, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (t, S, S))
    causal = torch.arange(S)[None, :] <= (torch.arange(t) + S - t)[:, None]          # [t, S]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    proximal = torch.zeros(S, dtype=torch.bool)
    proximal[:4] = True                                                               # sink
    proximal[-8:] = True                                                              # recent
    parts = [partial(q, k, v, D ** -0.5, causal & proximal), partial(q, k, v, D ** -0.5, causal & ~proximal)]
    out, lse = merge(parts)
    torch.testing.assert_close(out, full.float(), rtol=1e-5, atol=1e-5)
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -math.inf), -1)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    # a random three-way split, one part empty for every row
    which = torch.randint(0, 2, (S,), generator=g)
    parts = [partial(q, k, v, D ** -0.5, causal & (which == i)) for i in range(3)]
    assert torch.isneginf(parts[2][1]).all() and (parts[2][0] == 0).all()
    out, _ = merge(parts)
    torch.testing.assert_close(out, full.float(), rtol=1e-5, atol=1e-5)


def test_merge_of_nothing_is_zero_with_minus_inf():
    out, lse = merge([(torch.ones(1, 2, 3, 4), torch.full((1, 2, 3), -math.inf))] * 2)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_shared_keys_with_identity_map_reproduce_full_attention():
    """Two layers with identical pre-RoPE keys: distant keys taken from the leader, mapped by W = I and rotated,
    merged with the layer's own proximal part, give the layer's full attention."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = tiny_model("gqa", layers=2)
    rope = LlamaRotaryEmbedding(model.config)
    g = torch.Generator().manual_seed(1)
    S, D = 48, 16
    k_pre = torch.randn(1, 2, S, D, generator=g)                          # both layers' pre-RoPE keys
    q_pre, v = torch.randn(1, 4, S, D, generator=g), torch.randn(1, 2, S, D, generator=g)
    cos, sin = rope(v, torch.arange(S)[None])
    q, k = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
    kq, vq = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)         # GQA: 2 query heads per KV head
    causal = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
    full = torch.nn.functional.scaled_dot_product_attention(q, kq, vq, attn_mask=causal)
    w = torch.eye(D)
    _, k_shared = apply_rotary_pos_emb(q_pre, k_pre @ w, cos, sin)        # leader's keys, mapped, then RoPE
    proximal = torch.zeros(S, dtype=torch.bool)
    proximal[:2], proximal[-6:] = True, True
    near = partial(q, kq, vq, D ** -0.5, causal & proximal)
    far = partial(q, k_shared.repeat_interleave(2, 1), vq, D ** -0.5, causal & ~proximal)
    out, _ = merge([near, far])
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


# -- key maps --------------------------------------------------------------------------------------------------------
def test_fit_maps_recovers_a_known_map_and_identity():
    g = torch.Generator().manual_seed(2)
    D, N = 8, 5000
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, D, dtype=torch.float64)
    w_true = torch.randn(D, D, generator=g, dtype=torch.float64)
    y = x @ w_true
    w, fit, share = fit_maps(x.T @ x, x.T @ y, y.T @ y, ridge=1e-10)
    torch.testing.assert_close(w.double(), w_true, rtol=1e-4, atol=1e-4)
    assert fit.item() < 1e-8 and share.item() > 0.1
    w, fit, share = fit_maps(x.T @ x, x.T @ x, x.T @ x, ridge=1e-10)     # identical keys
    torch.testing.assert_close(w, torch.eye(D), rtol=0, atol=1e-6)
    assert fit.item() < 1e-8 and share.item() < 1e-12
    noisy = y + torch.randn(N, D, generator=g, dtype=torch.float64)       # noise: the error is what is left
    _, fit, _ = fit_maps(x.T @ x, x.T @ noisy, noisy.T @ noisy, ridge=1e-10)
    resid = noisy - x @ torch.linalg.lstsq(x, noisy).solution
    assert fit.item() == pytest.approx((resid.square().sum() / noisy.square().sum()).item(), rel=1e-4)


def record_heldout(profile) -> int:
    return profile.calibration["methods"]["pod"]["heldout"]


def test_map_error_on_other_data():
    from kvtool.sharing import map_error

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 4, generator=g, dtype=torch.float64)
    y = torch.randn(400, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)
    direct = (y - x @ w).square().sum() / y.square().sum()
    assert map_error(w, x.T @ x, x.T @ y, y.T @ y).item() == pytest.approx(direct.item(), rel=1e-6)


def test_identical_layers_group_together_with_identity_maps(text_file):
    model = identical_keys_model(same_queries=True)
    samples = [needle_sample(T=128, seed=i) for i in range(2)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    assert prof["layers.similarity"][0].min() > 0.999                     # layers 0 and 1 attend alike
    out = calibrate(model, ByteTokenizer(), "pod", profile=prof,
                    options={"threshold": 0.99, "ridge": 1e-9, "samples": 2, "seq_len": 128, "data": text_file})
    leader = out["layers.pod.leader"]
    assert leader[:, 0].tolist()[:2] == [0, 0]
    torch.testing.assert_close(out["layers.pod.map"][1], torch.eye(16).expand(2, 16, 16), rtol=0, atol=1e-4)
    assert out["layers.pod.fit_error"][1].max() < 1e-6 and out["layers.pod.share_error"][1].max() < 1e-6
    assert out["layers.pod.heldout_error"][1].max() < 1e-6


def test_pod_end_to_end_on_a_tiny_model(tmp_path, text_file):
    model = tiny_model("gqa", layers=4)
    samples = [needle_sample(T=128, seed=i) for i in range(2)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    out = calibrate(model, ByteTokenizer(), "pod", profile=prof,
                    options={"threshold": 0.0, "max_group": 3, "samples": 2, "seq_len": 100, "data": text_file})
    L, H, D = 4, 2, 16
    shapes = {k: tuple(v.shape) for k, v in out.tensors.items() if k.startswith("layers.pod.")}
    assert shapes == {"layers.pod.group": (L, H), "layers.pod.leader": (L, H), "layers.pod.map": (L, H, D, D),
                      "layers.pod.fit_error": (L, H), "layers.pod.share_error": (L, H),
                      "layers.pod.heldout_error": (L, H)}
    assert out["layers.pod.leader"][:, 0].tolist() == [0, 0, 0, 3]
    assert out["layers.pod.group"][:, 0].tolist() == [0, 0, 0, 1]
    fit, share = out["layers.pod.fit_error"], out["layers.pod.share_error"]
    assert (fit[1:3] > 0).all() and (fit[1:3] < share[1:3]).all()        # the map beats sharing keys unchanged
    assert (fit[[0, 3]] == 0).all()
    held = out["layers.pod.heldout_error"]
    assert (held[1:3] > 0).all() and (held[[0, 3]] == 0).all()          # measured on a sample not fitted on
    assert record_heldout(out) == 1
    summary = PoD.summary(out)
    assert summary["groups"] == [[0, 2]] and summary["layers sharing"] == 2
    assert summary["fit error"] == round(fit[1:3].mean().item(), 4)
    record = out.calibration["methods"]["pod"]
    assert record["threshold"] == 0.0 and record["groups"] == [[0, 2]] and record["rope"] == "pre"
    path = out.save(tmp_path / "pod.kv.st")
    again = Profile.load(path, model=model)
    torch.testing.assert_close(again["layers.pod.map"], out["layers.pod.map"])
    assert "layers.similarity" in again and "heads.retrieval_score" in again           # other sections kept


def test_pod_refuses_groups_over_sliding_layers_and_missing_similarity(text_file):
    model = tiny_model("sliding", layers=4)                                # layers 1 and 3 slide
    with pytest.raises(KvtoolError, match="spans sliding-window layer 1") as exc:
        calibrate(model, ByteTokenizer(), "pod", options={"groups": "0-1", "data": text_file})
    assert "\n" not in str(exc.value)
    with pytest.raises(KvtoolError, match="pod needs a profile's layers.similarity"):
        calibrate(model, ByteTokenizer(), "pod", options={"data": text_file})
    samples = [needle_sample(T=128, seed=0)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    del prof.tensors["layers.similarity"]
    with pytest.raises(KvtoolError, match="profile has no layers.similarity"):
        calibrate(model, ByteTokenizer(), "pod", profile=prof, options={"data": text_file})
    with pytest.raises(KvtoolError, match="bad option for --method pod"):
        calibrate(model, ByteTokenizer(), "pod", profile=prof, options={"nonsense": 1})


def test_sliding_layers_never_join_a_group(text_file):
    model = tiny_model("sliding", layers=4)
    samples = [needle_sample(T=128, seed=0)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    out = calibrate(model, ByteTokenizer(), "pod", profile=prof,
                    options={"threshold": 0.0, "samples": 1, "seq_len": 64, "data": text_file})
    assert out["layers.pod.leader"][:, 0].tolist() == [0, 1, 2, 3]      # every other layer slides: all alone
    assert out.calibration["methods"]["pod"]["groups"] == []


def test_inspect_lists_the_groups(text_file, tmp_path):
    from kvtool.inspect import plot, summarize

    model = tiny_model("gqa", layers=4)
    samples = [needle_sample(T=128, seed=0)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    out = calibrate(model, ByteTokenizer(), "pod", profile=prof,
                    options={"groups": "1-3", "samples": 1, "seq_len": 64, "data": text_file})
    (row,) = summarize(out)["pod"]
    fit = out["layers.pod.fit_error"][2:4]
    assert row["layers"] == "1-3" and row["leader"] == 1 and row["size"] == 3 and row["kv_head"] == "all"
    assert row["fit error (map)"] == round(fit.mean().item(), 4)
    assert "pod" not in summarize(prof)
    assert plot(out, tmp_path / "p.png").stat().st_size > 0


def test_per_head_groups_are_recorded_per_kv_head(text_file):
    model = tiny_model("gqa", layers=3)
    prof = profile_model(model, [needle_sample(T=128, seed=0)], config=TraceConfig(sink=4, recent=16, query_samples=8))
    sim = prof["layers.similarity"]                                       # [2, 2]
    thr = float(sim[0, 0] + sim[0, 1]) / 2                                # between the two heads at layers 0-1
    out = calibrate(model, ByteTokenizer(), "pod", profile=prof,
                    options={"per": "head", "threshold": thr, "samples": 1, "heldout": 0, "seq_len": 64,
                             "data": text_file})
    leader = out["layers.pod.leader"]
    assert leader.tolist() == group_layers(sim, thr).tolist()
    groups = out.calibration["methods"]["pod"]["groups"]
    assert len(groups) == 2 and groups == [[list(s) for s in spans(leader[:, h]) if s[1] > s[0]] for h in range(2)]
    assert "layers.pod.heldout_error" not in out
