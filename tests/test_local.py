"""Localisation: the Gaspari–Cohn taper, the LETKF against a dense Kalman update with the tapered R^-1 at every
site (and block), its global limit (the ETKF, the EnKF-N for prior N), batched radius == one at a time, and
Lorenz 96 with N = 10, below the unstable dimension, where the global ETKF diverges."""

from __future__ import annotations

import pytest
import torch

from danlab.cycle import run_cycles
from danlab.filters.ensemble import EnKF_N, ETKF
from danlab.filters.local import LETKF, block_distances, gaspari_cohn, localisation, periodic_distances
from danlab.models import Lorenz96
from danlab.observations import Obs, Observer
from danlab.rng import BatchRNG
from danlab.twin import TwinStream

f64 = torch.float64


def problem(B=3, N=8, Nx=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = 2.0 + torch.randn(B, N, Nx, generator=g, dtype=f64) @ (0.3 * torch.eye(Nx, dtype=f64) + 0.1)
    mask = (torch.rand(B, Nx, generator=g, dtype=f64) < 0.6).to(f64)
    y = (2.0 + torch.randn(B, Nx, generator=g, dtype=f64)) * mask
    return E, Obs(y=y, mask=mask, sigma=0.7)


def test_gaspari_cohn_shape():
    """1 at 0, 5/24 at the half-width, 0 from twice it on; continuous with continuous first and second derivatives
    at r = 1 and 2; and a valid correlation: the tapering matrix on a periodic grid of Nx sites is positive
    semi-definite while its support 2c is at most Nx/2."""
    r = torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=f64)
    assert torch.allclose(gaspari_cohn(r), torch.tensor([1.0, 5 / 24, 0.0, 0.0], dtype=f64), atol=1e-15)
    for r0 in (1.0, 2.0):
        h = 1e-5
        x = torch.tensor([r0 - 2 * h, r0 - h, r0, r0 + h, r0 + 2 * h], dtype=f64)
        v = gaspari_cohn(x)
        d1l, d1r = (v[2] - v[1]) / h, (v[3] - v[2]) / h
        d2l, d2r = (v[2] - 2 * v[1] + v[0]) / h**2, (v[4] - 2 * v[3] + v[2]) / h**2
        assert abs(d1l - d1r) < 1e-4 and abs(d2l - d2r) < 1e-2
    assert bool((gaspari_cohn(torch.linspace(0, 2, 201, dtype=f64)).diff() <= 1e-15).all())
    for c in (3.0, 7.5, 16.0):  # while the support 2c fits in half the circle
        rho = gaspari_cohn(periodic_distances(64) / c)
        assert float(torch.linalg.eigvalsh(rho).min()) > -1e-10
    # wider, the wrap-around breaks it (harmless for the LETKF, which tapers R^-1, not a covariance)
    assert float(torch.linalg.eigvalsh(gaspari_cohn(periodic_distances(64) / 20.0)).min()) < -1e-3


def dense_local_analysis(E, obs, radius, block=1, infl=1.0):
    """Mean and covariance after the Kalman update with P^f = X^T X (inflated) and, for block b, the precision
    H^T R_b^-1 H = diag(rho_bj m_j) / sigma^2 in state space, in Nx x Nx matrices: (B, Nx) means and (B, Nx, Nx)
    covariances, row block of each block taken from its own update."""
    B, N, Nx = E.shape
    xb = E.mean(-2)
    X = infl * (E - xb.unsqueeze(-2)) / (N - 1) ** 0.5
    P = X.mT @ X
    rho = localisation(Nx, radius, E, "gc", block)[0]  # (nb, Nx)
    xa, Pa = torch.empty(B, Nx, dtype=f64), torch.empty(B, Nx, Nx, dtype=f64)
    I = torch.eye(Nx, dtype=f64)
    for b in range(B):
        for blk in range(Nx // block):
            W = torch.diag(rho[blk] * obs.mask[b]) / obs.sigma**2
            K = torch.linalg.solve(I + P[b] @ W, P[b] @ W)  # (I + P W)^-1 P W
            m = xb[b] + K @ (obs.y[b] - xb[b] * obs.mask[b])
            C = torch.linalg.solve(I + P[b] @ W, P[b])
            s = slice(blk * block, (blk + 1) * block)
            xa[b, s], Pa[b, s] = m[s], C[s]
    return xa, Pa


@pytest.mark.parametrize("block, infl", [(1, 1.0), (4, 1.1), (3, 1.0)])
def test_letkf_is_the_local_kalman_update(block, infl):
    """At every site, the LETKF's analysis mean and (co)variances within each block are those of the Kalman update
    with the forecast covariance X^T X and the observation precision tapered by Gaspari–Cohn from that block."""
    E, obs = problem()
    Ea = LETKF(N=8, radius=4.0, block=block, infl=infl).analysis(E, obs, BatchRNG(0, "f", 3, [0, 1, 2]))
    xa, Pa = dense_local_analysis(E, obs, 4.0, block, infl)
    assert torch.allclose(Ea.mean(-2), xa, atol=1e-12)
    A = Ea - Ea.mean(-2, keepdim=True)
    C = A.mT @ A / 7
    for blk in range(24 // block):
        s = slice(blk * block, (blk + 1) * block)
        assert torch.allclose(C[:, s, s], Pa[:, s, s], atol=1e-12)


def test_global_limit_is_etkf_and_enkf_n():
    """With the step taper and a radius of Nx/2 every site sees every observation: ETKF, and EnKF-N for prior N."""
    E, obs = problem()
    rng = BatchRNG(0, "f", 3, [0, 1, 2])
    for block in (1, 4):
        a = LETKF(N=8, radius=12, taper="step", infl=1.1, block=block).analysis(E, obs, rng)
        assert torch.allclose(a, ETKF(N=8, infl=1.1).analysis(E, obs, rng), atol=1e-12)
        a = LETKF(N=8, radius=12, taper="step", prior="N", xN=1.5, block=block).analysis(E, obs, rng)
        assert torch.allclose(a, EnKF_N(N=8, xN=1.5).analysis(E, obs, rng), atol=1e-12)


def test_batched_hyperparameters_equal_one_at_a_time():
    """radius, infl and xN as (B,) tensors (a tuning grid in one run) give each row what its scalar gives."""
    E, obs = problem()
    rng = BatchRNG(0, "f", 3, [0, 1, 2])
    radius, infl, xN = [2.0, 5.0, 30.0], [1.0, 1.05, 1.2], [0.5, 1.0, 2.0]
    for prior in ("infl", "N"):
        filt = LETKF(N=8, prior=prior).model_copy(  # as `danlab tune` sets them
            update={"radius": torch.tensor(radius), "infl": torch.tensor(infl), "xN": torch.tensor(xN)})
        batched = filt.analysis(E, obs, rng)
        for b in range(3):
            one = LETKF(N=8, prior=prior, radius=radius[b], infl=infl[b], xN=xN[b]).analysis(E[b:b + 1], obs.select([b]), rng)
            assert torch.allclose(batched[b], one[0], atol=1e-12)


def test_block_distances():
    d = block_distances(8, 2)
    assert d.shape == (4, 8)
    assert torch.allclose(d[0], torch.tensor([0.5, 0.5, 1.5, 2.5, 3.5, 3.5, 2.5, 1.5], dtype=f64))


def test_lorenz96_below_the_unstable_dimension():
    """Lorenz 96 (Nx 40, 13 positive exponents) with N = 10: the global ETKF loses the truth, the LETKF tracks it
    (measured over 1000 cycles, 2 experiments: 0.215; DAPPER lists LETKF N 7, loc_rad 4 (radius 7.3): 0.22)."""
    model, observer = Lorenz96(), Observer(Nx=40)
    scores = {}
    for filt in (LETKF(N=10, radius=7.3, infl=1.04), ETKF(N=10, infl=1.04)):
        twin = TwinStream(model, observer, 2, seed=0, ids=[0, 1])
        scores[filt.method] = run_cycles(filt, model, twin, 400, 150, 0, ids=[0, 1]).scores()
    assert scores["letkf"]["n_diverged"] == 0 and scores["letkf"]["armse"] < 0.3
    assert scores["etkf"]["n_diverged"] == 2 or scores["etkf"]["armse"] > 1.0


def test_letkf_on_the_sphere_localises_in_great_circle_distance():
    """On QG on the sphere, prepare() takes the model's great-circle distances (km): a single observation at
    grid point j changes the analysis exactly at the points within 2 × radius km of j (Gaspari–Cohn support),
    whatever their distance in the state index, and leaves every other point as forecast."""
    from danlab.models.qg_sphere import QGSphere
    model = QGSphere(T=10)  # a 16 x 32 grid, Nx 512
    Nx, radius, j = model.Nx, 1500.0, 3 * 32 + 5
    f = LETKF(N=8, radius=radius).prepare(model, None, f64, "cpu")
    D = model.distances()
    assert torch.equal(f.dist, D)
    assert torch.allclose(localisation(Nx, radius, torch.zeros(1, dtype=f64), "gc", 1, f.dist)[0],
                          gaspari_cohn(D / radius))
    E = torch.randn(2, 8, Nx, generator=torch.Generator().manual_seed(0), dtype=f64)
    mask = torch.zeros(2, Nx, dtype=f64)
    mask[:, j] = 1.0
    obs = Obs(y=mask * 3.0, mask=mask, sigma=1.0)
    changed = (f.update(E, obs, None) - E).abs().amax((0, 1)) > 1e-12
    rho = gaspari_cohn(D[j] / radius)
    near = D[j] < 2 * radius
    assert torch.equal(rho > 0, near) and 1 < int(near.sum()) < Nx // 4
    assert bool(changed[rho > 1e-8].all()) and not bool(changed[~near].any())
    # the neighbourhood is a disc on the sphere, not an interval of the state index (rows of 32 points)
    assert bool(near[j + 32]) and not bool(near[(j + Nx // 2) % Nx])


def test_taper_has_finite_derivatives_and_default_blocks_are_sites():
    """The taper is differentiable everywhere, r = 0 and the support's edge included (no 1/r of the unused branch
    leaks into the gradient); the default localisation is per site, (1, Nx, Nx); a (B,) radius gives B tapers, each
    its scalar's."""
    r = torch.linspace(0.0, 2.5, 26, dtype=f64, requires_grad=True)
    gaspari_cohn(r).sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad[0] == 0 and (r.grad[21:] == 0).all()
    like = torch.zeros(1, dtype=f64)
    assert localisation(12, 3.0, like).shape == (1, 12, 12)
    both = localisation(12, torch.tensor([2.0, 4.5]), like, block=3)
    assert both.shape == (2, 4, 12)
    for b, c in enumerate((2.0, 4.5)):
        assert torch.equal(both[b], localisation(12, c, like, block=3)[0])

