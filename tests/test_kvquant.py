"""kvquant: k-means levels have the runtime's shapes and units, beat uniform levels on held-out activations, are
reproducible; the CLI refines a profile (keeping its other sections) and refuses bad input with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from calibrate.kvquant import NAMES, KVQuant, value_units
from conftest import needle_sample, tiny_model
from kvtool.api import profile_model
from kvtool.data import load_samples
from kvtool.errors import KvtoolError
from kvtool.models import load_model
from kvtool.profile import Profile
from kvtool.quant import ChannelQuantizer, decode, encode, pack, quantize_tokens, uniform_levels
from kvtool.trace import TraceConfig
from test_cli import _save_tiny, assert_one_line_error, run

FAST = dict(bits=(2, 3), vgroup=8, max_points=3000)


@pytest.fixture(scope="module")
def tiny():
    """A tiny GQA Llama (head_dim 16), 4 random-token samples (2 for calibration, 2 held out) and its profile."""
    model = tiny_model("gqa")
    samples = [needle_sample(T=128, seed=i) for i in range(4)]
    profile = profile_model(model, samples[:2], config=TraceConfig(sink=4, recent=16, query_samples=8))
    return model, samples, profile


def _levels(model, samples, profile, **kw):
    kq = KVQuant(**{**FAST, **kw})
    levels, fallback = kq.fit(kq.collect(model, samples, kq.check(model, profile)))
    return kq, levels, fallback


def _mse(x: torch.Tensor, levels: torch.Tensor) -> float:
    """x [L, H, n] normalised; levels [L, H, 2^b]: mean squared error of nearest-level rounding (the runtime's)."""
    return sum((decode(encode(x[l][None], levels[l]), levels[l]) - x[l][None]).square().mean().item()
               for l in range(x.shape[0])) / x.shape[0]


def test_levels_have_the_runtime_shape_and_beat_uniform_on_held_out_data(tiny):
    model, samples, profile = tiny
    kq, levels, fallback = _levels(model, samples[:2], profile)
    L, H = profile.model["num_layers"], profile.model["num_kv_heads"]
    assert set(levels) == {f"{n}.levels{b}" for n in NAMES for b in (2, 3)} and fallback == []
    for name, lv in levels.items():
        assert lv.dtype == torch.float32 and lv.shape == (L, H, 2 ** int(name[-1]))
        assert (lv.diff(dim=-1) > 0).all() and lv.min() >= 0 and lv.max() <= 1
    # held-out activations in the same units, every scalar of two other samples
    held = KVQuant(**{**FAST, "max_points": 10 ** 9}).collect(model, samples[2:], kq.check(model, profile))
    for name in NAMES:
        x = torch.stack([torch.from_numpy(xh) for xh, _ in held[name]])      # [L, H, n]
        assert x.shape[-1] == 2 * 128 * 16 and 0 <= x.min() and x.max() <= 1
        for b in (2, 3):
            uniform = _mse(x, uniform_levels(b).expand(L, H, -1))
            kmeans = _mse(x, levels[f"{name}.levels{b}"])
            assert kmeans < (0.8 if name.startswith("key") and b == 2 else 0.99) * uniform, (name, b, kmeans, uniform)


def test_profile_checks_the_codebooks_leading_axes(tiny):
    _, _, profile = tiny
    L, H = profile.model["num_layers"], profile.model["num_kv_heads"]
    Profile({"quant.value.levels3": torch.zeros(L, H, 8)}, profile.model, {}).validate()
    with pytest.raises(KvtoolError, match=rf"expected it to start with \[{L}, {H}\]"):
        Profile({"quant.value.levels3": torch.zeros(L, H + 1, 8)}, profile.model, {}).validate()


def test_normalisation_is_the_runtimes(tiny):
    """Encoding kvquant's normalised data gives exactly the codes the runtime's quantizers produce."""
    model, samples, profile = tiny
    kq, levels, _ = _levels(model, samples[:1], profile)
    ranges = kq.check(model, profile)
    result = model(samples[3].input_ids.view(1, -1), use_cache=True)
    out = result.cache if "cache" in type(result).__dataclass_fields__ else result.past_key_values   # 5.24 renamed it
    for layer in range(profile.model["num_layers"]):
        k, v = out.layers[layer].keys, out.layers[layer].values               # [1, H, T, D]
        lv = levels["value.levels3"][layer]
        torch.testing.assert_close(pack(encode(value_units(v, 8)[0], lv), 3), quantize_tokens(v, 3, 8, lv)[0],
                                   rtol=0, atol=0)
        lv = levels["key_post.levels2"][layer]
        q = ChannelQuantizer.from_range(ranges["post"][0][layer], ranges["post"][1][layer], 2, lv)
        t = kq.normalise("key_post", layer, k[0], ranges)[0]
        torch.testing.assert_close(pack(encode(t[None], lv), 2), q.quantize(k), rtol=0, atol=0)


def test_codebooks_are_reproducible(tiny):
    model, samples, profile = tiny
    _, a, _ = _levels(model, samples[:1], profile, bits=(2,))
    _, b, _ = _levels(model, samples[:1], profile, bits=(2,))
    _, c, _ = _levels(model, samples[:1], profile, bits=(2,), seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)                    # another subsample, other levels


def test_fisher_weighting_and_degenerate_heads(tiny):
    model, samples, profile = tiny
    _, plain, _ = _levels(model, samples[:1], profile, bits=(2,))
    _, fisher, fallback = _levels(model, samples[:1], profile, bits=(2,), weighting="fisher")
    assert fallback == [] and not torch.equal(plain["value.levels2"], fisher["value.levels2"])
    kq = KVQuant(bits=(3,))
    assert kq.kmeans(torch.tensor([0.0, 0.5, 1.0] * 10).numpy(), None, 8) is None   # 3 distinct values, 8 levels
    lv = kq.kmeans(torch.linspace(0, 1, 101).numpy(), None, 8)
    assert (lv[1:] > lv[:-1]).all() and lv[0] >= 0 and lv[-1] <= 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (head_dim 8) saved with the embedded tokenizer, and its profile (read-only: copy to change it)."""
    path = _save_tiny(tmp_path_factory.mktemp("tiny"), load_model()[1])
    model, tok = load_model(path)
    samples = load_samples(None, tok, 1, 96, n_needles=1)
    return path, profile_model(model, samples, config=TraceConfig(sink=4, recent=16)).save(path / "p.kv.st")


def test_cli_refines_a_profile_and_keeps_its_sections(capsys, tiny_dir, tmp_path):
    tiny_dir, shared = tiny_dir
    prof = tmp_path / "p.kv.st"
    shutil.copy(shared, prof)
    before = Profile.load(prof)
    args = ["calibrate", "--method", "kvquant", tiny_dir, "--profile", prof, "--samples", "1", "--seq-len", "192",
            "--vgroup", "4"]
    code, out, err = run(capsys, *args, "--bits", "2,3", "--json")
    assert code == 0, err
    assert json.loads(out)["bits"] == [2, 3] and json.loads(out)["output"] == str(prof)     # refined in place
    after = Profile.load(prof)
    assert all(torch.equal(after[k], t) for k, t in before.tensors.items())
    assert set(after.tensors) - set(before.tensors) == {f"quant.{n}.levels{b}" for n in NAMES for b in (2, 3)}
    assert after.policy == before.policy
    record = after.calibration["methods"]["kvquant"]
    assert {k: record[k] for k in ("kclip", "vgroup", "bits", "samples", "seq_len", "weighting")} == \
        {"kclip": 0.999, "vgroup": 4, "bits": [2, 3], "samples": 1, "seq_len": 192, "weighting": "none"}
    assert record["max_points"] == 20000 and record["seconds"] > 0 and "trace" in after.calibration["methods"]
    code, out, err = run(capsys, *args, "--bits", "2")                    # again: stale levels3 are dropped
    assert code == 0 and "kvquant: k-means levels for 2-bit" in out, err
    again = Profile.load(prof)
    assert not any(k.endswith("levels3") for k in again.tensors) and "quant.value.levels2" in again


@pytest.mark.parametrize("extra,needle", [
    (["--bits", "2,5"], "--bits must be some of 2, 3, 4, 8"),
    (["--bits", "two"], "--bits must be comma-separated integers"),
    (["--kclip", "0.98"], "no 0.02/0.98 key quantiles"),
    (["--vgroup", "3"], "--vgroup 3 does not divide head_dim 8"),
    (["--retrieval-fraction", "0.5"], "does not apply to kvquant"),
    (["--no-profile"], "give --profile"),
    (["--no-channels"], "has no channels.key_post.* ranges"),
])
def test_cli_bad_input(capsys, tiny_dir, tmp_path, extra, needle):
    tiny_dir, prof = tiny_dir
    if extra == ["--no-channels"]:
        p = Profile.load(prof)
        p.tensors = {k: t for k, t in p.tensors.items() if not k.startswith("channels.")}
        prof = p.save(tmp_path / "no-channels.kv.st")
    where = [] if extra == ["--no-profile"] else ["--profile", prof]
    extra = [] if extra[0].startswith("--no-") else extra
    code, _, err = run(capsys, "calibrate", "--method", "kvquant", tiny_dir, *where, "--samples", "1",
                       "--seq-len", "192", "--vgroup", "4", *extra, "-o", tmp_path / "x.kv.st")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x.kv.st").exists()
