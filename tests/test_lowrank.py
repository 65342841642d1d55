"""kvtool.lowrank: projection, reconstruction error = discarded eigenvalue mass, the value trick, rank choice."""

import math

import pytest
import torch

from kvtool.errors import KvtoolError
from kvtool.lowrank import (LowRank, choose_rank, discarded_mass, energy, parse_rank, project, reconstruct,
                            weighted_values)
from kvtool.stats import Moments


def _gaussian(n: int, d: int, seed: int):
    """n samples of N(mu, Q diag(lam) Qᵀ) in d dims, and the true (mu, lam descending, Q)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(1, -2, d, dtype=torch.float64)                  # 10 .. 0.01, descending
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * lam.sqrt() @ q.T + mu
    return x, mu, lam, q


@pytest.mark.parametrize("r", [1, 4, 8, 15])
def test_reconstruction_error_is_discarded_mass_on_fitted_data(r):
    d = 16
    x, *_ = _gaussian(100_000, d, seed=0)
    mom = Moments.zeros(1, 1, d)
    for part in x.float().split(25_000):                                  # as the trace adds samples
        mom.add(0, part.view(-1, 1, d))
    mean, eigvals, basis = mom.pca()                                      # [1, 1, D], [1, 1, D], [1, 1, D, D]
    z = project(x.float(), mean[0, 0], basis[0, 0], r)
    err = (reconstruct(z, mean[0, 0], basis[0, 0]).double() - x).square().sum(-1).mean()
    expected = discarded_mass(eigvals[0, 0], r)
    assert err.item() == pytest.approx(expected.item(), rel=2e-3, abs=1e-4)


@pytest.mark.parametrize("r", [2, 6, 12])
def test_reconstruction_error_matches_true_spectrum_on_new_samples(r):
    d = 16
    fit, mu, lam, q = _gaussian(200_000, d, seed=1)
    mom = Moments.zeros(1, 1, d)
    mom.add(0, fit.float().view(-1, 1, d))
    mean, _, basis = mom.pca()
    g = torch.Generator().manual_seed(7)                                  # fresh draws of the same Gaussian
    held = torch.randn(200_000, d, generator=g, dtype=torch.float64) * lam.sqrt() @ q.T + mu
    z = project(held.float(), mean[0, 0], basis[0, 0], r)
    err = (reconstruct(z, mean[0, 0], basis[0, 0]).double() - held).square().sum(-1).mean()
    assert err.item() == pytest.approx(lam[r:].sum().item(), rel=0.03)


def test_per_head_broadcasting():
    g = torch.Generator().manual_seed(3)
    B, H, T, D, r = 2, 3, 5, 8, 3
    x = torch.randn(B, H, T, D, generator=g)
    mean = torch.randn(H, D, generator=g)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g))[0]
    z = project(x, mean[:, None, :], basis, r)                            # [B, H, T, r]
    assert z.shape == (B, H, T, r)
    for h in range(H):
        ref = (x[:, h] - mean[h]) @ basis[h][:, :r]
        torch.testing.assert_close(z[:, h], ref)
    full = reconstruct(project(x, mean[:, None, :], basis, D), mean[:, None, :], basis)
    torch.testing.assert_close(full, x, atol=1e-5, rtol=1e-5)             # full rank: lossless


def test_value_trick_equals_attention_over_reconstructed_values():
    g = torch.Generator().manual_seed(4)
    B, H, G, t, S, D, r = 2, 3, 2, 4, 11, 16, 5
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    mean = torch.randn(H, 1, D, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g, dtype=torch.float64))[0]
    z = project(v, mean, basis, r)                                        # [B, H, S, r]
    p = torch.softmax(torch.randn(B, H, G * t, S, generator=g, dtype=torch.float64), -1)   # GQA rows folded in
    out = weighted_values(p, z, mean, basis)
    ref = p @ reconstruct(z, mean, basis)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(B, H, G * t, S, generator=g, dtype=torch.float64)     # rows not normalised (a partial softmax)
    torch.testing.assert_close(weighted_values(w, z, mean, basis), w @ reconstruct(z, mean, basis),
                               rtol=1e-12, atol=1e-12)


def test_choose_rank_by_energy():
    ev = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [9.0, 1.0, 0.0, 0.0]],
                       [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])     # [L=2, H=2, D=4]
    # energies: head (0,0) 0.4 0.7 0.9 1.0; (0,1) 0.9 1 1 1; (1,0) .25 .5 .75 1; (1,1) all-zero spectrum
    assert choose_rank(ev, "auto:0.9", per="head").tolist() == [[3, 1], [4, 1]]
    assert choose_rank(ev, "auto:0.9").tolist() == [[3, 3], [4, 4]]      # per layer: the layer's largest
    assert choose_rank(ev, "auto:0.5", per="head").tolist() == [[2, 1], [2, 1]]
    assert choose_rank(ev, "auto:1", per="head").tolist() == [[4, 2], [4, 1]]
    assert choose_rank(ev, 3).tolist() == [[3, 3], [3, 3]]
    assert choose_rank(ev, "2").tolist() == [[2, 2], [2, 2]]
    cum = energy(ev)
    assert cum[0, 0].tolist() == pytest.approx([0.4, 0.7, 0.9, 1.0])


def test_choose_rank_matches_energy_definition_on_random_spectra():
    g = torch.Generator().manual_seed(5)
    ev = torch.rand(4, 3, 32, generator=g).sort(-1, descending=True).values
    for e in (0.5, 0.9, 0.99):
        ranks = choose_rank(ev, f"auto:{e}", per="head")
        cum = energy(ev)
        for l in range(4):
            for h in range(3):
                r = int(ranks[l, h])
                assert cum[l, h, r - 1] >= e - 1e-6
                assert r == 1 or cum[l, h, r - 2] < e - 1e-6


@pytest.mark.parametrize("spec, message", [
    ("65", "krank=65 is larger than head_dim 64"),
    ("0", "krank=0: the rank must be at least 1"),
    ("-3", "the rank must be at least 1"),
    ("auto:0", "the energy must lie in (0, 1]"),
    ("auto:1.5", "the energy must lie in (0, 1]"),
    ("auto:x", "must be a number in (0, 1]"),
    ("big", "give a rank (an integer) or auto:ENERGY"),
])
def test_rank_errors_are_one_line(spec, message):
    with pytest.raises(KvtoolError) as exc:
        choose_rank(torch.ones(2, 1, 64), spec, name="krank")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_parse_rank_round_trip():
    assert str(parse_rank("auto:0.99", 64)) == "auto:0.99"
    assert str(parse_rank(" 32 ", 64)) == "32"
    assert parse_rank("AUTO:1", 8).energy == 1.0
    assert not math.isnan(parse_rank("auto:0.5", 8).energy)


def test_lowrank_reader_names_the_missing_section():
    with pytest.raises(KvtoolError, match="no lowrank.key section"):
        LowRank.from_tensors({}, "key")
