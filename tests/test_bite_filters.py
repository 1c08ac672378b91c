"""Tests that bite (issue 14): the shared ensemble algebra and the analyses against dense-matrix formulas
written out here, value by value. The stochastic EnKF is checked against K = P H^T (H P H^T + R)^-1 with the
same perturbations; the EnKF-N's Hessian transform against the primal Hessian; the IEnKF with the finite-size
prior against the EnKF-N on a linear model; the variational covariances against explicit loops. Each test is
well under a second; they are part of the selection that `make mutation` runs (docs/results/mutation.md)."""

from __future__ import annotations

import math

import pytest
import torch

from danlab.filters import base
from danlab.filters.base import (Filter, Window, WindowFilter, apply_sym, flag_rows, mean_and_anomalies, per_batch,
                                 rows_ok, safe_eigh, sanitise, spread, sym_eig_fn, window_run, zero_bad_rows)
from danlab.filters.ensemble import ETKF, EnKF, EnKF_N, _inflate, dual_inflation, hyperprior
from danlab.filters.iterative import IEnKF, IEnKS
from danlab.filters.variational import StaticB, Var3D, Var4D, circulant_average, climatology
from danlab.models import LinearModel, Lorenz96
from danlab.observations import Obs
from danlab.rng import BatchRNG, make_generator

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def problem(B=3, N=6, Nx=7, seed=0, sigma=0.8, frac=0.6, bias=0.0):
    """A random forecast ensemble and observations on a random subset of sites (at least one per row)."""
    g = gen(seed)
    E = 2.0 + 0.7 * torch.randn(B, N, Nx, generator=g, dtype=f64)
    mask = (torch.rand(B, Nx, generator=g, dtype=f64) < frac).to(f64)
    mask[:, 0] = 1.0
    y = (2.0 + bias + torch.randn(B, Nx, generator=g, dtype=f64)) * mask
    return E, Obs(y=y, mask=mask, sigma=sigma)


def dense(E_b: torch.Tensor, obs: Obs, b: int):
    """The mean, the sample covariance P (N - 1 normalised), H (rows of the identity on the observed sites),
    R and y of row b of a problem."""
    sites = obs.mask[b].nonzero().flatten()
    H = torch.eye(E_b.shape[-1], dtype=f64)[sites]
    R = obs.sigma**2 * torch.eye(len(sites), dtype=f64)
    return E_b.mean(0), torch.cov(E_b.mT), H, R, obs.y[b, sites]


# ---------------------------------------------------------------- shared algebra (filters/base.py)

def test_per_batch_mean_anomalies_and_spread_against_loops():
    E = torch.randn(2, 4, 3, generator=gen(1), dtype=f64)
    assert per_batch(1.3, E) == 1.3
    v = per_batch(torch.tensor([1.0, 2.0], dtype=torch.float32), E)
    assert v.shape == (2, 1, 1) and v.dtype == f64 and v.flatten().tolist() == [1.0, 2.0]
    xb, X = mean_and_anomalies(E)
    for b in range(2):
        for i in range(3):
            m = sum(float(E[b, n, i]) for n in range(4)) / 4
            assert float(xb[b, i]) == pytest.approx(m, abs=1e-15)
            for n in range(4):
                assert float(X[b, n, i]) == pytest.approx((float(E[b, n, i]) - m) / math.sqrt(3), abs=1e-15)
        ref = math.sqrt(sum(float(E[b, :, i].var()) for i in range(3)) / 3)
        assert float(spread(E)[b]) == pytest.approx(ref, rel=1e-13)
    one = E[:, :1]
    xb1, X1 = mean_and_anomalies(one)
    assert torch.equal(xb1, one[:, 0]) and torch.equal(X1, torch.zeros_like(one))
    s1 = spread(one)
    assert s1.shape == (2,) and s1.dtype == f64 and not s1.any()
    s2 = spread(E[:, :2])
    torch.testing.assert_close(s2, ((E[:, 0] - E[:, 1]) ** 2 / 2).mean(-1).sqrt(), rtol=1e-13, atol=0)


def test_rows_ok_sanitise_and_flag_rows():
    a = torch.ones(4, 2, 3)
    b = torch.ones(4, 5)
    a[1, 0, 2] = float("inf")
    b[3, 4] = float("nan")
    assert rows_ok(a).tolist() == [True, False, True, True]
    assert rows_ok(a, b).tolist() == [True, False, True, False]
    assert rows_ok(b, a).tolist() == [True, False, True, False]
    ok = rows_ok(a, b)
    t = torch.arange(24.0).view(4, 2, 3)
    assert sanitise(torch.ones(4, dtype=torch.bool), t) is t
    s = sanitise(ok, t)
    assert torch.equal(s[[0, 2]], t[[0, 2]]) and not s[[1, 3]].any()
    assert torch.equal(sanitise(ok, t, 5.0)[1], torch.full((2, 3), 5.0))
    f = flag_rows(ok, t)
    assert torch.equal(f[[0, 2]], t[[0, 2]]) and f[[1, 3]].isnan().all()


def test_zero_bad_rows_returns_a_finite_batch_untouched_and_zeroes_only_the_bad_rows():
    t = torch.arange(24.0, dtype=f64).view(4, 6, 1)
    all_ok = torch.ones(4, dtype=torch.bool)
    ok, u = zero_bad_rows(all_ok, t)
    assert ok is all_ok and u is t  # the usual case: nothing computed
    t[2, 3, 0] = float("nan")
    ok, u = zero_bad_rows(torch.tensor([True, False, True, True]), t)
    assert ok.tolist() == [True, False, False, True]
    assert torch.equal(u[[0, 3]], t[[0, 3]]) and not u[[1, 2]].any()
    big = torch.full((2, 3, 1), 1e308, dtype=f64)  # finite, but its sum overflows: the careful path says ok
    ok, u = zero_bad_rows(torch.ones(2, dtype=torch.bool), big)
    assert ok.all() and torch.equal(u, big)


def test_spread_of_a_stacked_forecast_and_analysis_equals_each_alone():
    """run_cycles takes both spreads from one (2, B, N, Nx) stack and its means: the same bits as one at a time."""
    Ef, Ea = (torch.randn(3, 20, 40, generator=gen(s), dtype=f64) * 3 + 1 for s in (4, 5))
    EE = torch.stack([Ef, Ea])
    s = spread(EE, EE.mean(-2))
    assert s.shape == (2, 3) and torch.equal(s[0], spread(Ef)) and torch.equal(s[1], spread(Ea))


def test_safe_eigh_and_the_symmetric_functions():
    A = torch.randn(3, 4, 4, generator=gen(2), dtype=f64)
    G = A @ A.mT + 0.1 * torch.eye(4, dtype=f64)
    lam, V, ok = safe_eigh(G)
    assert ok.all() and ok.shape == (3,) and ok.dtype == torch.bool
    lam0, V0 = torch.linalg.eigh(G)  # a finite batch: LAPACK's own numbers
    assert torch.equal(lam, lam0) and torch.equal(V, V0)
    torch.testing.assert_close(V @ torch.diag_embed(lam) @ V.mT, G, rtol=0, atol=1e-12)
    d = torch.rand(3, 4, generator=gen(3), dtype=f64)
    torch.testing.assert_close(apply_sym(V, d), V @ torch.diag_embed(d) @ V.mT, rtol=0, atol=1e-14)
    W, r = sym_eig_fn(G, lambda l: l.rsqrt())  # G^-1/2
    Gm = apply_sym(W, r)
    torch.testing.assert_close(Gm @ G @ Gm, torch.eye(4, dtype=f64).expand(3, 4, 4), rtol=0, atol=1e-10)
    G[2, 1, 1] = float("nan")
    W, r = sym_eig_fn(G, lambda l: l + 1)
    assert r[2].isnan().all() and torch.isfinite(r[:2]).all() and torch.isfinite(W).all()
    torch.testing.assert_close(r[:2], lam[:2] + 1, rtol=0, atol=1e-12)


def test_safe_eigh_when_lapack_fails_on_some_rows(monkeypatch):
    """A row on which eigh raises (LAPACK not converging) is found one at a time, replaced by the identity and
    flagged; the other rows are decomposed as they would be alone."""
    G = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=f64)), torch.full((3, 3), 7.0, dtype=f64),
                     torch.diag(torch.tensor([4.0, 5.0, 6.0], dtype=f64))])
    real = torch.linalg.eigh

    def flaky(M):
        if (M == 7.0).all(-1).all(-1).any():
            raise torch.linalg.LinAlgError("did not converge")
        return real(M)

    monkeypatch.setattr(base.torch.linalg, "eigh", flaky)
    lam, V, ok = safe_eigh(G)
    assert ok.tolist() == [True, False, True]
    assert lam[0].tolist() == [1.0, 2.0, 3.0] and lam[2].tolist() == [4.0, 5.0, 6.0]
    assert lam[1].tolist() == [1.0, 1.0, 1.0]  # the identity stands in for the failed row


class Nudge(Filter):
    """A toy analysis: every member halfway to the observations where observed."""

    def analysis(self, E, obs, rng):
        return E + 0.5 * obs.innovation(E)


def test_filter_cycle_step_start_restart():
    model = LinearModel(2.0 * torch.eye(3, dtype=f64))
    E = torch.randn(2, 4, 3, generator=gen(4), dtype=f64)
    obs = Obs(torch.ones(2, 3, dtype=f64), torch.ones(2, 3, dtype=f64), 1.0)
    f = Nudge(N=4)
    assert f.start(E) is E and f.prepare(model, None, f64, "cpu") is f
    Ef, Ea = f.cycle(E, model, obs, None)
    torch.testing.assert_close(Ef, 2.0 * E, rtol=0, atol=0)
    torch.testing.assert_close(Ea, 2.0 * E + 0.5 * (1.0 - 2.0 * E), rtol=0, atol=0)
    carry, Ef2, Ea2, Es, n = f.step(E, model, obs, None)
    assert carry is Ea2 and Es is None and n == 0
    torch.testing.assert_close(Ea2, Ea, rtol=0, atol=0)
    x = torch.tensor([[9.0, 9.0, 9.0], [7.0, 8.0, 9.0]], dtype=f64)
    r = f.restart(E, torch.tensor([False, True]), x)
    assert torch.equal(r[0], E[0]) and torch.equal(r[1], x[1].expand(4, 3))
    with pytest.raises(ValueError, match=r"N must be >= 2 for EnKF \(got 1\)"):
        EnKF(N=1)


def test_window_carry_restart_and_run():
    model = LinearModel(3.0 * torch.eye(2, dtype=f64))
    E = torch.ones(2, 3, 2, dtype=f64)
    runs = window_run(model, E, 3)
    assert len(runs) == 3 and [float(r[0, 0, 0]) for r in runs] == [3.0, 9.0, 27.0]
    assert window_run(model, E, 0) == []
    f = IEnKS(N=3, lag=2)
    c = f.start(E)
    assert isinstance(c, Window) and c.E is E and c.obs == () and c.unconverged is None
    o = Obs(torch.zeros(2, 2, dtype=f64), torch.ones(2, 2, dtype=f64), 1.0)
    un = torch.tensor([0, 2])
    r = f.restart(Window(E, (o,), un), torch.tensor([True, False]), torch.full((2, 2), 5.0, dtype=f64))
    assert r.obs == (o,) and r.unconverged is un
    assert torch.equal(r.E[0], torch.full((3, 2), 5.0, dtype=f64)) and torch.equal(r.E[1], E[1])
    with pytest.raises(ValueError, match="with lag 2 carries a window: run it by start/step"):
        f.cycle(E, model, o, None)
    with pytest.raises(NotImplementedError):
        WindowFilter(N=2).window_analysis(E, model, (o,), [1.0])


# ---------------------------------------------------------------- ensemble filters

def test_inflation():
    E = torch.randn(2, 5, 3, generator=gen(5), dtype=f64)
    assert _inflate(E, 1.0) is E
    xb = E.mean(-2, keepdim=True)
    torch.testing.assert_close(_inflate(E, 1.2), xb + 1.2 * (E - xb), rtol=0, atol=1e-15)
    t = _inflate(E, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(t[0], E[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(t[1], xb[1] + 0.5 * (E[1] - xb[1]), rtol=0, atol=1e-15)
    E2, obs = problem(B=2, N=5, Nx=3)
    a = ETKF(N=5, infl=1.3).analysis(E2, obs, None)
    torch.testing.assert_close(a, ETKF(N=5).analysis(_inflate(E2, 1.3), obs, None), rtol=0, atol=1e-13)


@pytest.mark.parametrize("infl", [1.0, 1.1])
def test_stochastic_enkf_is_the_kalman_update_of_each_perturbed_member(infl):
    """E^a_n = E_n + K (y + e_n - H E_n), K = P H^T (H P H^T + R)^-1, P the sample covariance of the inflated
    forecast, e_n sigma times the seeded draws centred over the members and rescaled by sqrt(N/(N-1))."""
    E, obs = problem(B=3, N=6, Nx=7, seed=1)
    Ea = EnKF(N=6, infl=infl).analysis(E, obs, BatchRNG(5, "filter", 3, [0, 1, 2]))
    eps = BatchRNG(5, "filter", 3, [0, 1, 2]).randn(6, 7, dtype=f64)
    for b in range(3):
        Eb = _inflate(E[b:b + 1], infl)[0]
        xb, P, H, R, y = dense(Eb, obs, b)
        e = (eps[b] - eps[b].mean(0)) * math.sqrt(6 / 5)
        K = P @ H.mT @ torch.linalg.inv(H @ P @ H.mT + R)
        for n in range(6):
            ref = Eb[n] + K @ (y + obs.sigma * (H @ e[n]) - H @ Eb[n])
            torch.testing.assert_close(Ea[b, n], ref, rtol=0, atol=1e-12)


def test_etkf_mean_and_covariance_are_the_kalman_analysis():
    """ETKF: mean x̄ + K (y - H x̄), covariance (I - K H) P, and the anomalies stay centred (symmetric root)."""
    E, obs = problem(B=3, N=6, Nx=4, seed=2, sigma=0.6)
    Ea = ETKF(N=6, infl=1.05).analysis(E, obs, None)
    for b in range(3):
        Eb = _inflate(E[b:b + 1], 1.05)[0]
        xb, P, H, R, y = dense(Eb, obs, b)
        K = P @ H.mT @ torch.linalg.inv(H @ P @ H.mT + R)
        torch.testing.assert_close(Ea[b].mean(0), xb + K @ (y - H @ xb), rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cov(Ea[b].mT), P - K @ H @ P, rtol=0, atol=1e-12)


def test_enkf_n_hessian_transform_is_the_inverse_root_of_the_primal_hessian():
    """hess=True: the analysis anomalies are sqrt(N-1) T X_l with T = Hw^-1/2, Hw = u S S^T + I - 2 w w^T /
    ((N-1) eps_N + |w|^2), X_l the prior anomalies inflated by the estimated l = sqrt(u); its mean is the
    default (hess=False) analysis' mean, whose anomalies use (u S S^T + I)^-1/2 instead."""
    E, obs = problem(B=2, N=5, Nx=6, seed=3, bias=1.5)
    N = 5
    plain = EnKF_N(N=N, xN=1.5).analysis(E, obs, None)
    hess = EnKF_N(N=N, xN=1.5, hess=True).analysis(E, obs, None)
    for b in range(2):
        xb, X = mean_and_anomalies(E[b:b + 1])
        ob = obs.select([b])
        S = ob.H(X) / ob.sigma
        d = ob.innovation(xb) / ob.sigma
        lam, V = torch.linalg.eigh(S[0] @ S[0].mT)
        lam = lam.clamp(min=0)
        eps, c = hyperprior(lam[None], N, 1.5)
        Sd = S[0] @ d[0]
        u = dual_inflation(lam[None], ((V.mT @ Sd) ** 2 / (N - 1))[None], eps, c)
        u = float(u)
        Xl = math.sqrt(u) * X[0]
        A = u * S[0] @ S[0].mT + torch.eye(N, dtype=f64)
        w = math.sqrt(u) * torch.linalg.solve(A, Sd)
        mean = xb[0] + w @ Xl
        torch.testing.assert_close(plain[b].mean(0), mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(hess[b].mean(0), mean, rtol=0, atol=1e-12)
        la, Va = torch.linalg.eigh(A)
        Ta = Va @ torch.diag(la.rsqrt()) @ Va.mT
        torch.testing.assert_close(plain[b] - mean, math.sqrt(N - 1) * Ta @ Xl, rtol=0, atol=1e-12)
        Hw = A - 2 * torch.outer(w, w) / ((N - 1) * float(eps) + w @ w)
        lh, Vh = torch.linalg.eigh(Hw)
        Th = Vh @ torch.diag(lh.rsqrt()) @ Vh.mT
        torch.testing.assert_close(hess[b] - mean, math.sqrt(N - 1) * Th @ Xl, rtol=0, atol=1e-12)


def test_hyperprior_and_dual_inflation():
    """eps_N = xN (N+1)/N / mc, c_N = xN N/(N-1) mc, mc = (eps/c)^(mean(1/(1+lam))/2); the dual minimiser u
    zeroes the derivative of J(t) = sum q_i/(lam_i(lam_i u + 1)) + eps/u + c log u."""
    lam = torch.tensor([[0.0, 0.5, 2.0, 9.0], [0.1, 0.1, 0.3, 4.0]], dtype=f64)
    N = 4
    eps, c = hyperprior(lam, N, 2.0)
    for b in range(2):
        mc = ((N + 1) / N / (N / (N - 1))) ** (0.5 * float((1 / (1 + lam[b])).mean()))
        assert float(eps[b]) == pytest.approx(2.0 * (N + 1) / N / mc, rel=1e-14)
        assert float(c[b]) == pytest.approx(2.0 * N / (N - 1) * mc, rel=1e-14)
    e2, c2 = hyperprior(lam, N, torch.tensor([1.0, 3.0], dtype=f64))
    assert e2.shape == (2, 1) and float(e2[1]) == pytest.approx(1.5 * float(eps[1]), rel=1e-14)
    q = torch.tensor([[0.3, 1.0, 4.0, 20.0], [0.0, 0.2, 0.1, 0.5]], dtype=f64)
    u = dual_inflation(lam, q, eps, c)
    for b in range(2):
        ub = float(u[b])
        dJ = -sum(float(q[b, i]) / float(lam[b, i] * ub + 1) ** 2 for i in range(4)) - float(eps[b]) / ub**2 + float(c[b]) / ub
        assert abs(dJ * ub) < 1e-10 and ub > 0
    assert float(u[0]) > 1.5 > float(u[1])  # large innovations ask for inflation, small ones for deflation
    # one iteration from t = log u = 0: a Newton step where J'' > 0, clipped to |dt| <= 1
    u1 = dual_inflation(lam, q, eps, c, max_iter=1)
    for b in range(2):
        L, Q, e_, c_ = lam[b], q[b], float(eps[b]), float(c[b])
        g = -float((Q / (L + 1) ** 2).sum()) - e_ + c_
        h = -float((Q * (1 - L) / (L + 1) ** 3).sum()) + e_
        step = max(-1.0, min(1.0, g / h if h > 0 else math.copysign(1.0, g)))
        assert float(u1[b]) == pytest.approx(math.exp(-step), rel=1e-12)


# ---------------------------------------------------------------- iterative filters

def linear_problem(N=6, Nx=4, seed=0):
    g = gen(seed)
    M = torch.eye(Nx, dtype=f64) + 0.2 * torch.randn(Nx, Nx, generator=g, dtype=f64)
    E = torch.randn(2, N, Nx, generator=g, dtype=f64)
    mask = torch.ones(2, Nx, dtype=f64)
    mask[1, 1] = 0.0
    y = (torch.randn(2, Nx, generator=g, dtype=f64) + 1.0) * mask
    return LinearModel(M), E, Obs(y, mask, 0.9)


@pytest.mark.parametrize("xN", [1.0, 2.0])
def test_ienkf_with_the_finite_size_prior_is_the_enkf_n_on_a_linear_model(xN):
    """On a linear model the IEnKF-N converges to the primal EnKF-N's minimiser, whose analysis (mean and
    covariance) is the dual EnKF-N's; the forecast it returns is the model run of the prior."""
    model, E, obs = linear_problem()
    Ef, Ea = IEnKF(N=6, prior="N", xN=xN, tol=1e-12, max_iter=60).cycle(E, model, obs, None)
    torch.testing.assert_close(Ef, model(E), rtol=0, atol=1e-12)
    ref = EnKF_N(N=6, xN=xN).analysis(model(E), obs, None)
    torch.testing.assert_close(Ea.mean(-2), ref.mean(-2), rtol=0, atol=1e-9)
    for b in range(2):
        torch.testing.assert_close(torch.cov(Ea[b].mT), torch.cov(ref[b].mT), rtol=0, atol=1e-9)


def test_ienkf_iterations_and_forecast_on_lorenz96():
    """The forecast returned is the inflated prior run by the model (transform variant); one Gauss-Newton
    iteration is not converged on a nonlinear model over Δt = 0.2, ten are; a tighter tolerance iterates more."""
    m = Lorenz96(Nx=8, dt=0.05)
    g = gen(6)
    x = 8.0 + torch.randn(2, 8, generator=g, dtype=f64)
    for _ in range(100):
        x = m(x)
    E = x.unsqueeze(1) + torch.randn(2, 5, 8, generator=g, dtype=f64)
    model4 = lambda z: m(m(m(m(z))))  # noqa: E731
    xt = model4(x)
    obs = Obs(xt + 0.5 * torch.randn(2, 8, generator=g, dtype=f64), torch.ones(2, 8, dtype=f64), 0.5)
    f = IEnKF(N=5, infl=1.1)
    c1 = f.step(f.start(E), model4, obs, None)
    torch.testing.assert_close(c1[1], model4(_inflate(E, 1.1)), rtol=0, atol=1e-12)
    assert c1[0].unconverged is None or c1[0].unconverged.sum() == 0
    one = IEnKF(N=5, infl=1.1, max_iter=1).step(f.start(E), model4, obs, None)
    assert one[0].unconverged.tolist() == [1, 1]
    e1 = (one[2].mean(-2) - xt).pow(2).mean().sqrt()
    e10 = (c1[2].mean(-2) - xt).pow(2).mean().sqrt()
    assert e10 < e1
    loose = IEnKF(N=5, infl=1.1, tol=10.0).step(f.start(E), model4, obs, None)
    torch.testing.assert_close(loose[2], one[2], rtol=0, atol=1e-12)  # |dw| < 10 after the first step


# ---------------------------------------------------------------- variational filters

def test_circulant_average_against_loops():
    C = torch.randn(5, 5, generator=gen(7), dtype=f64)
    A = circulant_average(C)
    for i in range(5):
        for j in range(5):
            ref = sum(float(C[(i + s) % 5, (j + s) % 5]) for s in range(5)) / 5
            assert float(A[i, j]) == pytest.approx(ref, abs=1e-14)


def test_climatology_is_the_sample_covariance_of_free_runs():
    m = Lorenz96(Nx=6, dt=0.05)
    g = make_generator(3, "var3d/climatology")
    x = m.spinup(m.initial(torch.randn(2, 6, generator=g, dtype=f64)))
    xs = []
    for _ in range(30):
        x = m(x)
        xs.append(x)
    X = torch.cat(xs)
    raw = climatology(m, trajectories=2, cycles=30, seed=3, homogeneous=False)
    torch.testing.assert_close(raw, torch.cov(X.mT), rtol=0, atol=1e-12)
    torch.testing.assert_close(climatology(m, trajectories=2, cycles=30, seed=3), circulant_average(raw), rtol=0,
                               atol=1e-12)


def test_static_b_prepare_and_background():
    C = torch.eye(3, dtype=f64) + 0.5
    f = Var3D(scale=2.0, cov=C)
    p = f.prepare(None, None, torch.float32, "cpu")
    assert p.cov.dtype == torch.float32 and f.cov.dtype == f64 and torch.equal(p.cov, C.float())
    E = torch.zeros(2, 1, 3, dtype=f64)
    torch.testing.assert_close(f.background_cov(E), 2.0 * C, rtol=0, atol=0)
    t = Var3D(cov=C).model_copy(update={"scale": torch.tensor([1.0, 3.0], dtype=f64)}).background_cov(E)
    assert t.shape == (2, 3, 3) and torch.equal(t[1], 3.0 * C)
    with pytest.raises(ValueError, match="works on a single state: got an ensemble of 2 members"):
        f.background_cov(torch.zeros(2, 2, 3, dtype=f64))
    with pytest.raises(RuntimeError, match="used before prepare"):
        Var3D().background_cov(E)
    m = Lorenz96(Nx=6)
    q = StaticB(clim_trajectories=2, clim_cycles=20, clim_seed=4, homogeneous=False).prepare(m, None, f64, "cpu")
    torch.testing.assert_close(q.cov, climatology(m, 2, 20, 4, False), rtol=0, atol=0)


class NumpyModel:
    """A model that leaves autograd (through numpy)."""

    Nx = 4

    def __call__(self, x):
        return torch.from_numpy(x.detach().numpy().copy())


def test_var4d_one_cycle_window_on_a_linear_model():
    """Lag 1: the analysis at the window start is x^b + B M^T H^T (H M B M^T H^T + R)^-1 (y - H M x^b), and the
    filtering analysis is its model run; the forecast returned is the model run of the background."""
    model, E, obs = linear_problem(N=1)
    C = torch.eye(4, dtype=f64) + 0.3
    v4 = Var4D(scale=0.5, cov=C, tol=1e-12).prepare(model, None, f64, "cpu")
    assert v4.cov is not None
    Ef, Ea = v4.cycle(E, model, obs, None)
    torch.testing.assert_close(Ef, model(E), rtol=0, atol=1e-12)
    M, B = model.M, 0.5 * C
    for b in range(2):
        sites = obs.mask[b].nonzero().flatten()
        H = torch.eye(4, dtype=f64)[sites] @ M
        xb = E[b, 0]
        x0 = xb + B @ H.mT @ torch.linalg.solve(H @ B @ H.mT + 0.81 * torch.eye(len(sites), dtype=f64),
                                                 obs.y[b, sites] - H @ xb)
        torch.testing.assert_close(Ea[b, 0], M @ x0, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="var4d needs a model differentiable by autograd"):
        Var4D(cov=C).prepare(NumpyModel(), None, f64, "cpu")
