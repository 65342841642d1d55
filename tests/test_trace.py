"""The chunked trace against a naive computation from full eager attention matrices.

The naive side runs the model with transformers' own eager attention (its own mask and softmax) through a recording
wrapper, keeps every full [H, T, S] attention matrix and the key/value tensors, and computes each statistic
directly. Tolerances: attention statistics 1e-4 absolute (float32, different summation order); min/max 1e-5 (eager and
sdpa outputs differ by rounding, so later layers see slightly different inputs);
quantiles within one histogram bin (6% of the value + 0.004); PCA eigenvalues 1e-4 relative against scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from conftest import needle_sample, tiny_model
from kvtool.trace import TraceConfig, Tracer

RECORD: list[dict] = []


def _recording_eager(module, query, key, value, attention_mask, **kwargs):
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    RECORD.append({"layer": module.layer_idx, "key": key[0].detach().clone(), "value": value[0].detach().clone(),
                   "attn": weights[0].detach().clone()})
    return out, weights


AttentionInterface.register("naive_record", _recording_eager)
AttentionMaskInterface.register("naive_record", eager_mask)


def naive_trace(model, sample):
    """Full attention matrices per layer, pre-RoPE keys via a hook on k_norm / k_proj."""
    RECORD.clear()
    pre = {}
    hooks = []
    for mod in [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")]:
        src = getattr(mod, "k_norm", None) or mod.k_proj
        hooks.append(src.register_forward_hook(lambda m, i, o, l=mod.layer_idx: pre.__setitem__(l, o.detach().clone())))
    previous = model.config._attn_implementation
    model.set_attn_implementation("naive_record")
    try:
        with torch.no_grad():
            model.model(input_ids=sample.input_ids.view(1, -1), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    return sorted(RECORD, key=lambda r: r["layer"]), pre


CFG = TraceConfig(sink=4, recent=16, query_samples=0, window=8, chunk=7, recall_threshold=-1.0)


@pytest.mark.parametrize("kind", ["gqa", "mha", "mqa", "sliding"])
def test_chunked_trace_matches_naive(kind):
    model = tiny_model(kind)
    sample = needle_sample(T=96)
    stats = Tracer(model, CFG).run([sample])
    acc = stats.acc
    records, pre = naive_trace(model, sample)
    T = sample.input_ids.numel()
    H = model.config.num_attention_heads
    hd = stats.dims.head_dim
    eligible = torch.arange(CFG.sink + CFG.recent, T)
    for r in records:
        l, A = r["layer"], r["attn"]                                           # A: [H, T, T]
        rows = A[:, eligible]
        sink = rows[..., : CFG.sink].sum(-1)
        recent = torch.stack([A[:, i, i - CFG.recent + 1: i + 1].sum(-1) for i in eligible.tolist()], 1)
        ent = torch.special.entr(rows).sum(-1)
        n = eligible.numel()
        torch.testing.assert_close(acc["sink_mass"].value()[l], sink.mean(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(acc["recent_mass"].value()[l], recent.mean(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(acc["streaming_mass"].value()[l], (sink + recent).mean(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(acc["entropy"].value()[l], ent.mean(1), atol=1e-4, rtol=0)
        assert acc["sink_mass"].count[l, 0] == n
        # copy score: argmax of the row before each answer token lands on the same token inside the needle
        ids, hits = sample.input_ids, torch.zeros(H)
        (ns, ne), = sample.needle_spans
        for a, _src in sample.copy_pairs.tolist():
            top = A[:, a - 1].argmax(-1)
            hits += ((top >= ns) & (top < ne) & (ids[top] == ids[a])).float()
        torch.testing.assert_close(acc["copy"].value()[l], hits / len(sample.copy_pairs), atol=1e-6, rtol=0)
        # per-channel statistics, post-RoPE keys and values: [S, H_kv, D]
        for name, x in (("key_post", r["key"]), ("value", r["value"]), ("key_pre", pre[l].reshape(T, -1, hd))):
            x = x.transpose(0, 1) if name != "key_pre" else x
            torch.testing.assert_close(acc[name].lo[l], x.amin(0), atol=1e-5, rtol=0)
            torch.testing.assert_close(acc[name].hi[l], x.amax(0), atol=1e-5, rtol=0)
            _check_quantiles(stats, name, l, x)
            _check_pca(stats, name, l, x)
    # inter-layer similarity of the last `window` rows
    for l in range(len(records) - 1):
        P, Q = records[l]["attn"][:, -CFG.window:], records[l + 1]["attn"][:, -CFG.window:]
        M = 0.5 * (P + Q)
        js = 0.5 * (torch.special.xlogy(P, P / M).nansum(-1) + torch.special.xlogy(Q, Q / M).nansum(-1))
        torch.testing.assert_close(acc["similarity"].value()[l], (1 - js / math.log(2)).mean(1), atol=1e-4, rtol=0)


def _check_quantiles(stats, name, layer, x):
    """The histogram estimate lies between the order statistics around q*n, widened by one bin (~6% + 0.004)."""
    levels = list(stats.config.quantile_levels)
    est = stats.acc[name].quantiles(levels)[layer]                             # [H_kv, D, Q]
    xs = x.permute(1, 2, 0).sort(-1).values                                    # [H_kv, D, N]
    n = xs.shape[-1]
    for j, q in enumerate(levels):
        below = xs[..., max(math.floor(q * (n - 1)) - 1, 0)]
        above = xs[..., min(math.ceil(q * n), n - 1)]
        slack = 0.06 * torch.maximum(below.abs(), above.abs()) + 0.004
        assert (est[..., j] >= below - slack).all() and (est[..., j] <= above + slack).all(), (name, q)


def _check_pca(stats, name, layer, x):
    mean, evals, basis = stats.acc[f"{name}_moments"].pca()
    n = x.shape[0]
    for h in range(x.shape[1]):
        ref = PCA().fit(x[:, h].double().numpy())
        np.testing.assert_allclose(mean[layer, h].numpy(), ref.mean_, atol=1e-5)
        k = min(ref.explained_variance_.shape[0], 4)
        np.testing.assert_allclose(evals[layer, h, :k].numpy() * n / (n - 1), ref.explained_variance_[:k],
                                   rtol=1e-4, atol=1e-7)
        cos = np.abs((basis[layer, h, :, 0].double().numpy() * ref.components_[0]).sum())
        assert cos > 0.999


def test_query_sampling_matches_naive_on_the_same_rows():
    model = tiny_model("gqa")
    sample = needle_sample(T=96)
    cfg = TraceConfig(sink=4, recent=16, query_samples=9, window=8, chunk=4)
    stats = Tracer(model, cfg).run([sample])
    records, _ = naive_trace(model, sample)
    rows = torch.linspace(20, 95, 9).round().long().unique()
    for r in records:
        sink = r["attn"][:, rows, : cfg.sink].sum(-1).mean(1)
        torch.testing.assert_close(stats.acc["sink_mass"].value()[r["layer"]], sink, atol=1e-4, rtol=0)


def test_trace_restores_attention_implementation_and_output():
    model = tiny_model("gqa")
    sample = needle_sample()
    with torch.no_grad():
        before = model(sample.input_ids.view(1, -1)).logits
    Tracer(model, CFG).run([sample])
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(sample.input_ids.view(1, -1)).logits
    torch.testing.assert_close(before, after)


def test_shard_merge_equals_whole():
    model = tiny_model("sliding")
    samples = [needle_sample(T=80 + 8 * i, seed=i) for i in range(4)]
    whole = Tracer(model, CFG).run(samples)
    a = Tracer(model, CFG).run(samples[:1])
    b = Tracer(model, CFG).run(samples[1:])
    merged = a.merge(b)
    for name, acc in whole.acc.items():
        for key, t in acc.state(name).items():
            other = merged.acc[name].state(name)[key]
            if t.dtype in (torch.int64, torch.int32):
                assert torch.equal(t, other), key                              # counts: exact
            else:
                torch.testing.assert_close(other, t, rtol=1e-12, atol=1e-12)    # float64 sums: summation order
    assert merged.samples == 4


def test_non_finite_activations_are_refused():
    from kvtool.errors import KvtoolError

    model = tiny_model("gqa")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(KvtoolError, match="non-finite.*layer 1"):
        Tracer(model, CFG).run([needle_sample()])
    assert model.config._attn_implementation == "sdpa"


def test_unknown_architecture_is_refused():
    """A model without attention modules (Mamba: state-space layers) is refused in one line; GPT-2 and Phi-3 are
    traced (tests/test_architectures.py)."""
    from kvtool.errors import KvtoolError

    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(KvtoolError, match="does not understand MambaForCausalLM"):
        Tracer(mamba)
