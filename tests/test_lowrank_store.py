"""The low-rank store (kvtool/stores/lowrank.py) and its cache plumbing (kvtool/lowrank_setup.py): full rank is exact
attention, the rank-r key error is the discarded eigenvalue mass, the value path is attention over reconstructed
values, nbytes is exact, a calibrated tiny model generates through CompressedCache, and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvtool.api import calibrate, profile_model
from kvtool.cache import CompressedCache, prefill, with_cache
from kvtool.data import text_file_samples
from kvtool.errors import KvtoolError
from kvtool.kvstore import RopeTable
from kvtool.lowrank import LowRank, discarded_mass
from kvtool.lowrank_setup import latent, layer_ranks
from kvtool.stores import partial
from kvtool.stores.lowrank import LowRankStore
from kvtool.trace import TraceConfig
from test_pod import ByteTokenizer

B, H, G, D = 1, 2, 2, 16


def _rope():
    return RopeTable.of(tiny_model("gqa"), D)


def _section(seed: int, lam: torch.Tensor | None = None) -> dict:
    """A synthetic `lowrank.` section [1, H, ...]: random orthonormal bases, means, descending eigenvalues `lam`,
    latent ranges ±3·sqrt(λ) (lo/hi) and ±2·sqrt(λ) (qlo/qhi)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(1, -2, D) if lam is None else lam
    out = {}
    for name in ("key", "value"):
        basis = torch.linalg.qr(torch.randn(H, D, D, generator=g))[0]             # [H, D, D] orthonormal columns
        mean = torch.randn(H, D, generator=g)
        ev = lam.expand(H, D).clone()
        s = ev.sqrt()
        for f, t in (("mean", mean), ("eigvals", ev), ("basis", basis), ("lo", -3 * s), ("hi", 3 * s),
                     ("qlo", -2 * s), ("qhi", 2 * s)):
            out[f"lowrank.{name}.{f}"] = t[None].float()
    return out


def _draw(sec: dict, name: str, n: int, seed: int) -> torch.Tensor:
    """n vectors per head from N(mean, basis·diag(λ)·basisᵀ): [B, H, n, D]."""
    lr = LowRank.from_tensors(sec, name)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, n, D, generator=g) * lr.eigvals[0].sqrt()[:, None, :]
    return z @ lr.basis[0].transpose(-1, -2) + lr.mean[0][:, None, :]


def _store(sec, rk, rv, bits=16, sink=2, buffer=3, dtype=torch.float32, rope=True, block=8):
    heads = torch.arange(H)
    lats = []
    for name, r in (("key", rk), ("value", rv)):
        lr = LowRank.from_tensors(sec, name)
        lats.append(latent(lr, 0, heads, r, bits, lr.lo, lr.hi))
    return LowRankStore(lats[0], lats[1], _rope() if rope else None, sink, buffer, dtype, block=block)


def _data(sec, n, seed=0):
    """Post-RoPE keys (pre-RoPE keys drawn from the section's Gaussian, then rotated), values, queries."""
    k_pre = _draw(sec, "key", n, seed)
    v = _draw(sec, "value", n, seed + 1)
    q = torch.randn(B, H * G, n, D, generator=torch.Generator().manual_seed(seed + 2))
    return q, _rope().rotate(k_pre, 0), v, k_pre


def _run(store, q, k, v, chunks):
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        o, _ = store.attend(q[:, :, start:start + n], pos, 0.25, new=(k[:, :, start:start + n], v[:, :, start:start + n]))
        store.append(k[:, :, start:start + n], v[:, :, start:start + n], pos)
        outs.append(o)
        start += n
    return torch.cat(outs, 2)


@pytest.mark.parametrize("chunks", [[40], [9, 1, 1, 20, 9], [1] * 40])
def test_full_rank_is_exact_attention(chunks):
    sec = _section(0)
    q, k, v, _ = _data(sec, 40)
    store = _store(sec, D, D)
    got = _run(store, q, k, v, chunks)
    pos = torch.arange(40)
    ref = partial(q, k, v, 0.25, pos.view(1, -1) <= pos.view(-1, 1))[0]
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=0)
    if len(chunks) > 1:
        assert store.n_body > 20                                               # the body was really read


@pytest.mark.parametrize("r", [2, 6, 12])
def test_rank_r_key_error_is_the_discarded_eigen_mass(r):
    sec = _section(1)
    n = 20_000
    _, k, v, k_pre = _data(sec, n, seed=3)
    store = _store(sec, r, D, sink=0, buffer=0, block=4096)
    store.append(k, v, torch.arange(n))
    assert store.n_body == n and store.key.rank == r
    kk, _, _ = store.read()                                                    # post-RoPE, reconstructed
    err = (kk.double() - k.double()).square().sum(-1).mean().item()          # RoPE is a rotation: same error
    expected = discarded_mass(LowRank.from_tensors(sec, "key").eigvals[0, 0], r).item()
    assert err == pytest.approx(expected, rel=0.03)
    pre_err = (_rope().unrotate(kk, 0).double() - k_pre.double()).square().sum(-1).mean().item()
    assert pre_err == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("bits", [16, 4])
def test_value_path_is_attention_over_reconstructed_values(bits):
    sec = _section(2)
    q, k, v, _ = _data(sec, 45, seed=5)
    store = _store(sec, 5, 7, bits=bits)
    _run(store, q, k, v, [20, 1, 24])
    kk, vv, kpos = store.read()
    for t in (1, 6):
        qpos = torch.arange(45 - t, 45) + 1
        got, lse = store.attend(q[:, :, :t], qpos, 0.25)
        ref, ref_lse = partial(q[:, :, :t], kk, vv, 0.25, store.visible(qpos, kpos))
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=0)
    # and the reconstructed values are the projection of the originals on the first r_v axes (16-bit latent)
    if bits == 16:
        lr = LowRank.from_tensors(sec, "value")
        u = lr.basis[0][..., :7]
        body = slice(2, 45 - store.buf_k.shape[2])
        want = (v[:, :, body] - lr.mean[0][:, None]) @ u @ u.transpose(-1, -2) + lr.mean[0][:, None]
        torch.testing.assert_close(vv[:, :, body], want, atol=1e-5, rtol=0)


def test_nbytes_exact():
    sec = _section(3)
    q, k, v, _ = _data(sec, 45, seed=7)
    s = _store(sec, 5, 7, dtype=torch.float16, sink=2, buffer=3)
    _run(s, q, k, v, [20, 25])
    body = 45 - 2 - 3
    dense = (2 + 3) * 2 * H * D * 2                                            # fp16 sink + buffer, K and V
    latents = body * H * (5 + 7) * 2
    consts = 4 * (H * D + H * D * 5) + 4 * (H * D + H * D * 7)                 # mean + r basis columns, float32
    assert s.nbytes() == dense + latents + consts
    s4 = _store(sec, 5, 7, bits=4, dtype=torch.float16, sink=2, buffer=3)
    _run(s4, q, k, v, [20, 25])
    assert s4.key.rank == 8 and s4.value.rank == 8                           # rounded up to a multiple of 8
    codes = 2 * body * H * 8 * 4 // 8
    consts4 = 2 * (4 * (H * D + H * D * 8) + 4 * (2 * H * 8 + 16))           # + lo/span [H, 8] and 16 levels
    assert s4.nbytes() == dense + codes + consts4
    s.reset()
    assert s.nbytes() == 0 and len(s) == 0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = tmp_path_factory.mktemp("lrs") / "calib.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{i}" for i in torch.randint(0, 40, (2000,), generator=g).tolist()))
    model, tok = tiny_model("gqa"), ByteTokenizer()
    samples = text_file_samples(str(path), tok, 100, 3)
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=8))
    out = calibrate(model, tok, "pca", profile=prof, options={"samples": 2, "seq_len": 100, "data": str(path)})
    return model, samples, out, prof                    # calibrate returns a new profile; prof stays the bare trace


def _logits(model, ids, cache, chunk=13):
    outs = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            outs.append(model(input_ids=ids[:, s:s + chunk], **with_cache(model, cache), use_cache=True).logits)
    return torch.cat(outs, 1)


def test_cache_generates_with_auto_ranks(calibrated):
    model, samples, prof, _ = calibrated
    ids = samples[0].input_ids.view(1, -1)[:, :60]
    policy = "heads=all,krank=auto:0.99,vrank=auto:0.99"
    cache = CompressedCache(model, prof, policy)
    ranks = layer_ranks(cache.lowrank)
    assert all(isinstance(layer.groups[0].store, LowRankStore) for layer in cache.layers)
    assert all(1 <= r <= D for pair in ranks for r in pair) and min(min(p) for p in ranks) < D
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == 68
    full = CompressedCache(model, prof, "heads=all,sink=4,buffer=0,dtype=fp32,krank=16")
    assert layer_ranks(full.lowrank) == [(D, D)] * 3                       # vrank unset: full rank
    prefill(model, ids, full)
    low = CompressedCache(model, prof, policy + ",sink=4,buffer=0,dtype=fp32")
    prefill(model, ids, low)
    assert 0 < low.nbytes() < full.nbytes()
    # full rank through chunks (the body really read) equals the plain model; low rank differs but stays close
    ref = model(ids).logits
    got_full = _logits(model, ids, CompressedCache(model, prof, "heads=all,sink=4,buffer=0,dtype=fp32,krank=16"))
    torch.testing.assert_close(got_full, ref, atol=2e-4, rtol=0)
    got_low = _logits(model, ids, CompressedCache(model, prof, policy + ",sink=4,buffer=0,dtype=fp32"))
    assert 1e-4 < (got_low - ref).abs().max() < 0.5 * ref.abs().max()
    q4 = CompressedCache(model, prof, policy + ",k=4,v=4")
    out4 = model.generate(ids, **with_cache(model, q4), max_new_tokens=4, do_sample=False)
    assert out4.shape[1] == 64 and all(r % 8 == 0 for p in layer_ranks(q4.lowrank) for r in p)


def test_krope_post_is_ignored_keys_stay_pre_rope(calibrated):
    """krank implies pre-RoPE keys: krope=post (the default) and krope=pre give the same store and output."""
    model, samples, prof, _ = calibrated
    ids = samples[1].input_ids.view(1, -1)[:, :40]
    a = _logits(model, ids, CompressedCache(model, prof, "heads=all,krank=6,buffer=0,dtype=fp32,krope=post"))
    b = _logits(model, ids, CompressedCache(model, prof, "heads=all,krank=6,buffer=0,dtype=fp32,krope=pre"))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_one_line_errors(calibrated):
    model, _, prof, traced = calibrated
    cases = [
        (traced, "heads=all,krank=8", r"no lowrank section \(run kvtool calibrate --method pca --profile P\)"),
        (None, "heads=all,vrank=auto:0.9", "run kvtool calibrate --method pca --profile P"),
        (prof, "heads=all,krank=17", "krank=17 is larger than head_dim 16"),
        (prof, "heads=all,vrank=0", "vrank=0: the rank must be at least 1"),
        (prof, "heads=all,krank=auto:1.5", r"energy must lie in \(0, 1\]"),
        (prof, "heads=all,krank=8,k=4,kclip=0.99", "calibrated at clip=0.999"),
    ]
    for profile, policy, msg in cases:
        with pytest.raises(KvtoolError, match=msg) as err:
            CompressedCache(model, profile, policy)
        assert "\n" not in str(err.value)
