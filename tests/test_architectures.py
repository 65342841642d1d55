"""The architecture matrix: one tiny random-init model per family (tests/families.py) through everything kvtool does —
`kvtool profile` on a local directory, every calibration method, `kvtool inspect`, the runtime with the lossless policy
(greedy tokens equal DynamicCache's) and with compressing policies — and what a family cannot do refused in one line.

README.md's "Supported architectures" table is generated from FAMILY_ROWS below (`python tests/test_architectures.py`
prints it); test_readme_table_is_the_matrix keeps the two equal, and the tests here check every claim of the rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from families import FAMILIES, ROPE, TRACED, family_model
from kvtool.api import calibrate
from kvtool.cache import CompressedCache, with_cache
from kvtool.errors import KvtoolError
from kvtool.kvstore import RopeTable
from kvtool.models import load_model
from kvtool.profile import Profile
from kvtool.trace import Dims, attention_modules, key_source, observing
from test_cli import assert_one_line_error, run
from test_methods import TINY

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(FAMILIES)
# the calibration methods' options here: test_methods' TINY, with duo on short samples (seconds per family)
OPTIONS = {**TINY, "duo": {"preset": "cpu", "steps": 2, "passkeys": 1, "words": 4, "min_len": 160, "max_len": 192,
                           "lengths": 2, "train_sink": 4, "train_recent": 32, "deploy_sink": 4, "deploy_recent": 16}}

# family: (README name, what is special about it). The runtime policies every family runs are POLICIES; a family
# refuses exactly the policies in REFUSED (with the one line given there).
FAMILY_ROWS = {
    "llama": ("Llama", "GQA"),
    "mistral": ("Mistral", "a sliding window on every layer (no `layer_types`): the cache keeps each layer's window, "
                           "as DynamicCache does, and a policy finds no full-attention layer to compress"),
    "qwen2": ("Qwen 2", "q/k/v biases"),
    "qwen3": ("Qwen 3", "q/k norm (also with alternating sliding layers)"),
    "gemma2": ("Gemma 2", "logit soft-capping, `query_pre_attn_scalar`, alternating sliding layers"),
    "gemma3": ("Gemma 3", "q/k norm after the transpose, MQA, head_dim ≠ hidden/heads, sliding layers with their own "
                          "RoPE base"),
    "phi3": ("Phi-3", "fused `qkv_proj`"),
    "gpt2": ("GPT-2", "MHA, learned positions (no RoPE)"),
    "gpt-oss": ("GPT-OSS", "attention sinks (`s_aux`), alternating sliding layers, MoE"),
}
SAME_ROW = {"qwen3-sliding": "qwen3"}                   # extra matrix entries that share a README row

# policy id -> policy string (sink/recent/buffer small enough that 60 tokens reach every part of every store)
SMALL = "sink=4,recent=16,buffer=8"
POLICIES = {
    "k4v4-pre": f"heads=retrieval:0.5,k=4,v=4,krope=pre,{SMALL}",
    "k4v4-post": f"heads=retrieval:0.5,k=4,v=4,{SMALL}",
    "kmeans": f"heads=razor:0.5,k=2,v=2,codebook=kmeans,vgroup=4,{SMALL}",
    "pca": f"heads=duo:0.5,krank=8,vrank=8,{SMALL}",
    "pod-on": f"heads=all,pod=on,{SMALL}",
    "pod-map": f"heads=all,pod=map,{SMALL}",
}
REFUSED = {
    "gpt2": {"k4v4-pre": "krope=pre needs a model with a full-width rotary embedding; GPT2LMHeadModel has no RoPE",
             "pod-map": "pod=map maps pre-RoPE keys and needs a full-width rotary embedding; GPT2LMHeadModel has "
                        "no RoPE"},
}
# families the tracer refuses (so: no profile, no calibration) and its one line; they run policies without a profile
UNTRACED = {"gpt-oss": "the tracer does not handle attention sinks (s_aux) yet"}
NO_PROFILE_POLICY = f"heads=random:0.5,{SMALL}"
# what the README says each policy shows (in POLICIES order)
POLICY_TEXT = {"k4v4-pre": "`k=4,v=4,krope=pre`", "k4v4-post": "`k=4,v=4`", "kmeans": "`codebook=kmeans`",
               "pca": "`krank`/`vrank`", "pod-on": "`pod=on`", "pod-map": "`pod=map`"}


KEYS_TEXT = {"norm": "after the key norm", "proj": "`k_proj`", "fused": "key slice of `qkv_proj`",
             None: "the keys (no RoPE)"}


def table_markdown() -> str:
    """README.md's "Supported architectures" table, from the rows and refusals above and the models themselves (where
    the tracer finds their pre-RoPE keys)."""
    lines = ["| family | the tiny test model has | pre-RoPE keys | compressing policies that run "
             "| refused, in one line |", "|---|---|---|---|---|"]
    for name, (title, special) in FAMILY_ROWS.items():
        if name in UNTRACED:
            lines.append(f"| {title} | {special} | — | `{NO_PROFILE_POLICY}` (no profile) | "
                         f"`profile`, `calibrate`: {UNTRACED[name]} |")
            continue
        model = family_model(name)
        found = key_source(model, attention_modules(model)[0])
        refused = REFUSED.get(name, {})
        runs = ", ".join(POLICY_TEXT[p] for p in POLICIES if p not in refused)
        why = "; ".join(f"{POLICY_TEXT[p]}: {msg.split(';')[-1].strip()}" for p, msg in refused.items()) or "—"
        lines.append(f"| {title} | {special} | {KEYS_TEXT[found[1] if found else None]} | {runs} | {why} |")
    return "\n".join(lines)


# -- models ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


@pytest.fixture(scope="module")
def profiled(tok, tmp_path_factory):
    """family -> (model directory, loaded model, profile path): built on first use; `kvtool profile DIR` traced it."""
    done = {}

    def get(name):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            family_model(name, vocab=len(tok)).save_pretrained(root / "model")
            tok.save_pretrained(root / "model")
            target = root / "p.kv.st"
            code = _profile_cli(root / "model", target)
            assert code == 0
            done[name] = (root / "model", load_model(str(root / "model"))[0], target)
        return done[name]

    return get


def _profile_cli(model_dir, target, *extra):
    from conftest import cli_exit_code

    return cli_exit_code("profile", model_dir, "--samples", "2", "--seq-len", "160", "--needles", "1", "--sink", "4",
                         "--recent", "16", "--query-samples", "16", "-o", target, *extra)


def _generate(model, ids, cache=None, n=10):
    with torch.no_grad():
        kw = with_cache(model, cache) if cache is not None else {}
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _prompt(vocab: int, T: int = 50) -> torch.Tensor:
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(1))


# -- the matrix -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lossless_policy_reproduces_dynamic_cache(name):
    """Greedy tokens with the lossless policy equal DynamicCache's, past every sliding window (24 < 60 tokens): the
    attention honours soft-capping, the model's scaling and its sliding layers."""
    model = family_model(name)
    ids = _prompt(model.config.vocab_size)
    ref = _generate(model, ids, DynamicCache(config=model.config))
    previous = model.config._attn_implementation
    cache = CompressedCache(model, None, "heads=all,dtype=model")
    got = _generate(model, ids, cache)
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == ids.shape[1] + 9
    window = getattr(model.config, "sliding_window", None)
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:
            assert len(layer.stores[0]) == window - 1 < cache.get_seq_length()
    assert any(layer.is_sliding for layer in cache.layers) == (window is not None and name != "qwen3")
    # a model switched to the kvtool attention still matches with an ordinary cache (the plain path)
    again = _generate(model, ids, DynamicCache(config=model.config))
    assert torch.equal(again, ref)
    model.set_attn_implementation(previous)


@pytest.mark.parametrize("name", sorted(ROPE & set(TRACED)))
def test_pre_rope_keys_round_trip_through_rope(name):
    """The trace's pre-RoPE keys (after the key norm, the key slice of a fused qkv_proj, ...) rotated by the model's
    own RoPE table (per layer type: Gemma 3's sliding layers have their own base) are the keys the model caches, and
    un-rotating the cached keys gives them back."""
    model = family_model(name)
    ids = _prompt(model.config.vocab_size, 40)
    pre = {}

    class Keep:
        def observe_attention(self, *args):
            pass

    with observing(model, Keep(), lambda mod, k: pre.__setitem__(mod.layer_idx, k.detach())), torch.no_grad():
        model.get_decoder()(input_ids=ids, use_cache=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **with_cache(model, cache), use_cache=True)
    d = Dims.of(model)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * d.layers
    for layer in range(d.layers):
        post = cache.layers[layer].keys[0]                                   # [H_kv, T', D] (a window: the last T')
        k = pre[layer].transpose(0, 1)[None]                                 # [1, H_kv, T, D]
        assert k.shape[1:] == (d.kv_heads, ids.shape[1], d.head_dim)
        table = RopeTable.of(model, d.head_dim, types[layer])
        start = ids.shape[1] - post.shape[1]
        rotated = table.rotate(k[:, :, start:], start)[0]
        torch.testing.assert_close(rotated, post.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(table.unrotate(post[None], start)[0], k[0, :, start:], atol=1e-5, rtol=1e-5)
    if name == "gemma3":                                                     # the two tables really differ
        local, glob = (RopeTable.of(model, d.head_dim, t).get(0, 8, "cpu")[1] for t in ("sliding_attention",
                                                                                       "full_attention"))
        assert not torch.allclose(local, glob)


@pytest.mark.parametrize("name", TRACED)
def test_fisher_gradients_reach_the_pre_rope_keys(name):
    """kvquant's Fisher weighting takes gradients of the pre-RoPE keys wherever the family keeps them (a key norm's
    output, a slice of a fused projection, GPT-2's attention keys): no head falls back to uniform levels."""
    from calibrate.kvquant import KVQuant
    from conftest import needle_sample
    from kvtool.api import profile_model
    from kvtool.trace import TraceConfig

    model = family_model(name)
    samples = [needle_sample(T=128, seed=i) for i in range(2)]
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    kq = KVQuant(bits=(2,), vgroup=4, weighting="fisher")
    points = kq.collect(model, samples[:1], kq.check(model, prof))
    assert all(w is not None and (w > 0).any() for x, w in points["key_pre"])
    assert kq.fit(points)[1] == []


@pytest.mark.parametrize("name", TRACED)
def test_trace_attention_is_exact(name):
    """The trace's attention returns the model's own output (soft-capped exactly for Gemma 2, where sdpa cannot)."""
    model = family_model(name)
    ids = _prompt(model.config.vocab_size, 40)

    class Nothing:
        def observe_attention(self, *args):
            pass

    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with observing(model, Nothing()):
            got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TRACED)
def test_profile_calibrate_inspect_run(capsys, profiled, tok, tmp_path, name):
    """`kvtool profile DIR` (every statistic, incl. pre-RoPE keys), every calibration method on its profile,
    `kvtool inspect`, then each compressing policy generates (or is refused in one line, as REFUSED says)."""
    model_dir, model, path = profiled(name)
    capsys.readouterr()
    prof = Profile.load(path, model=model)
    d = Dims.of(model)
    for kind in ("key_pre", "key_post", "value"):
        for stat in ("min", "max", "absmax", "quantiles"):
            t = prof[f"channels.{kind}.{stat}"]
            assert torch.isfinite(t).all() and t.abs().sum() > 0, (kind, stat)
        assert prof[f"pca.{kind}.eigvals"].shape == (d.layers, d.kv_heads, d.head_dim)
        assert prof[f"pca.{kind}.eigvals"].sum() > 0
    for head in ("sink_mass", "recent_mass", "entropy", "copy_score"):
        assert prof[f"heads.{head}"].shape == (d.layers, d.kv_heads) and torch.isfinite(prof[f"heads.{head}"]).all()
    assert prof["layers.similarity"].shape == (d.layers - 1, d.kv_heads)
    if name not in ROPE:                                                     # no RoPE: pre-RoPE keys are the keys
        assert torch.equal(prof["channels.key_pre.max"], prof["channels.key_post.max"])
    else:
        assert not torch.equal(prof["channels.key_pre.max"], prof["channels.key_post.max"])
    for method in sorted(OPTIONS):
        prof = calibrate(model, tok, method, profile=prof, options=dict(OPTIONS[method]))
        assert method in prof.calibration["methods"]
    prof.save(tmp_path / "all.kv.st")
    code, out, err = run(capsys, "inspect", tmp_path / "all.kv.st")
    assert code == 0 and "Traceback" not in err, err
    ids = _prompt(model.config.vocab_size, 60)
    full = CompressedCache(model, prof, "heads=all,dtype=model")
    ref = _generate(model, ids, full, n=6)
    for pid, policy in POLICIES.items():
        refused = REFUSED.get(name, {}).get(pid)
        if refused:
            with pytest.raises(KvtoolError) as exc:
                CompressedCache(model, prof, policy)
            assert refused in str(exc.value) and "\n" not in str(exc.value)
            continue
        cache = CompressedCache(model, prof, policy)
        got = _generate(model, ids, cache, n=6)
        assert got.shape == ref.shape and torch.equal(got[:, :ids.shape[1]], ids), pid
        assert cache.get_seq_length() == ids.shape[1] + 5
        if all(layer.is_sliding for layer in cache.layers):                  # Mistral: the window is all there is
            assert cache.nbytes() == cache.full_nbytes(torch.float16), pid
        elif pid not in ("pod-on", "pod-map"):
            assert cache.nbytes() < cache.full_nbytes(torch.float16), pid


@pytest.mark.parametrize("name", sorted(UNTRACED))
def test_untraced_family_is_refused_in_one_line_and_runs_without_a_profile(capsys, tok, tmp_path, name):
    """GPT-OSS: `kvtool profile` and a calibration say in one line that attention sinks are not traced; without a
    profile, a streaming policy generates and holds less than the full cache."""
    family_model(name, vocab=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    code = _profile_cli(tmp_path / "model", tmp_path / "p.kv.st")
    assert_one_line_error(code, capsys.readouterr().err, UNTRACED[name])
    assert not (tmp_path / "p.kv.st").exists()
    code, _, err = run(capsys, "calibrate", "--method", "razor", tmp_path / "model", "--probe-len", "16",
                       "-o", tmp_path / "r.kv.st")
    assert_one_line_error(code, err, UNTRACED[name])
    model = family_model(name)
    ids = _prompt(model.config.vocab_size, 60)
    cache = CompressedCache(model, None, NO_PROFILE_POLICY)
    got = _generate(model, ids, cache, n=6)
    assert torch.equal(got[:, :60], ids) and got.shape[1] == 66
    assert cache.nbytes() < cache.full_nbytes(torch.float16)


def test_cli_refuses_gpt2_krope_pre_in_one_line(capsys, profiled):
    model_dir, _, path = profiled("gpt2")
    capsys.readouterr()
    code, _, err = run(capsys, "run", model_dir, "--profile", path, "--prompt", "hello", "--max-new-tokens", "2",
                       "--no-chat", "--policy", POLICIES["k4v4-pre"])
    assert_one_line_error(code, err, REFUSED["gpt2"]["k4v4-pre"])


def test_profile_of_one_family_is_refused_for_another(capsys, profiled, tmp_path):
    """The fingerprint refuses a profile made for another model in one line that names both models and the shape
    that differs; the same shapes with other weights are refused too."""
    llama_dir, llama, llama_profile = profiled("llama")
    gemma_dir, gemma, gemma_profile = profiled("gemma3")
    capsys.readouterr()
    with pytest.raises(KvtoolError) as exc:
        Profile.load(gemma_profile, model=llama)
    assert str(exc.value) == (f"profile was made for another model: {gemma_dir} (Gemma3ForCausalLM: 3 layers, "
                              f"4 query / 1 KV heads of 32), not {llama_dir} (LlamaForCausalLM: 2 layers, 4 query / "
                              "2 KV heads of 16) (num_layers differs)")
    code, _, err = run(capsys, "calibrate", "--method", "razor", llama_dir, "--profile", gemma_profile,
                       "--probe-len", "16", "-o", tmp_path / "x.kv.st")
    assert_one_line_error(code, err, "profile was made for another model")
    assert not (tmp_path / "x.kv.st").exists()
    other = family_model("llama", seed=1, vocab=llama.config.vocab_size)
    with pytest.raises(KvtoolError, match="same shapes, other weights"):
        Profile.load(llama_profile, model=other)


def test_profile_on_a_directory_prints_the_summary(capsys, profiled, tmp_path):
    """`kvtool profile DIR` of a non-Llama family: the same summary (table, or --json) and closing line as for the
    embedded model."""
    model_dir, _, _ = profiled("gemma3")
    capsys.readouterr()
    code = _profile_cli(model_dir, tmp_path / "g.kv.st", "--json")
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert summary["model"] == str(model_dir) and summary["samples"] == 2 and summary["kv_heads"] == 3 * 1
    code = _profile_cli(model_dir, tmp_path / "g2.kv.st")
    cap = capsys.readouterr()
    assert code == 0 and "kvtool profile" in cap.out and "mean_streaming_mass" in cap.out
    assert "Traced 2 samples of 160 tokens" in cap.err and "Traceback" not in cap.err


def test_readme_table_is_the_matrix():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- architectures: begin.*?-->\n(.*?)\n<!-- architectures: end -->", text, re.S)
    assert block, "README.md has no architectures block"
    assert block.group(1).strip() == table_markdown().strip(), \
        "README.md: regenerate the table with python tests/test_architectures.py"
    assert set(FAMILY_ROWS) | set(SAME_ROW) == set(FAMILIES)


if __name__ == "__main__":
    print(table_markdown())
