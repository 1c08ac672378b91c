"""Smoothers over a data-assimilation window (IEnKS, 4D-Var): exact identities on linear-Gaussian problems
(the Kalman filter and smoother), the IEnKF as the IEnKS of lag 1, batched == one at a time, the smoothing
scores of the DA loop, and short statistical checks on Lorenz 96."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danlab.cycle import run_cycles
from danlab.filters.iterative import IEnKF, IEnKS
from danlab.observations import Observer
from danlab.rng import BatchRNG
from danlab.twin import TwinStream
from test_filters_classical import (L96, NX, SIGMA, SITES, _run, ensemble_with_moments, kalman_step, linear_model,
                                    subset_observer)

f64 = torch.float64


def kalman_smoother_start(m0, P0, M, ys, lag_start):
    """Mean at time lag_start given y_1..y_k of the linear model without model noise, from x_0 ~ N(m0, P0):
    the posterior of x_0 run forward (no model noise: the smoother is the analysis of the initial state)."""
    H = torch.eye(NX, dtype=f64)[list(SITES)]
    info, b = torch.linalg.inv(P0), torch.linalg.solve(P0, m0)
    Mi = torch.eye(NX, dtype=f64)
    for y in ys:
        Mi = M @ Mi
        G = H @ Mi
        info, b = info + G.mT @ G / SIGMA**2, b + G.mT @ y / SIGMA**2
    return torch.linalg.matrix_power(M, lag_start) @ torch.linalg.solve(info, b)


@pytest.mark.parametrize("kw", [dict(lag=3), dict(lag=3, mda=True), dict(lag=4, variant="bundle"),
                                dict(lag=2, mda=True, max_iter=1)])
def test_ienks_is_the_kalman_filter_and_smoother_on_a_linear_model(kw):
    """Full-rank ensemble with exact moments, no inflation: every filtering analysis is the Kalman filter's
    (mean and covariance), every smoothed mean at t_{k-L} the Kalman smoother's, SDA and MDA alike."""
    model = linear_model()
    twin = TwinStream(model, subset_observer(), 1, seed=0, ids=[0])
    m, P = torch.zeros(NX, dtype=f64), 2.0 * torch.eye(NX, dtype=f64)
    m0, P0 = m.clone(), P.clone()
    filt = IEnKS(N=NX + 2, **kw)
    carry = filt.start(ensemble_with_moments(m, P, NX + 2).unsqueeze(0))
    rng = BatchRNG(0, "filter", 1, [0])
    ys, smoothed = [], 0
    tol = 1e-7 if kw.get("variant") == "bundle" else 1e-9
    for k in range(1, 12):
        _, obs = twin.step()
        ys.append(obs.y[0, list(SITES)])
        carry, Ef, Ea, Es, n = filt.step(carry, model, obs, rng)
        m, P = kalman_step(m, P, model.M, obs)
        torch.testing.assert_close(Ea[0].mean(0), m, rtol=0, atol=tol)
        torch.testing.assert_close(torch.cov(Ea[0].mT), P, rtol=0, atol=tol)
        assert n == min(k, filt.lag) and (Es is None) == (k < filt.lag)
        if Es is not None:
            torch.testing.assert_close(Es[0].mean(0), kalman_smoother_start(m0, P0, model.M, ys, k - n),
                                       rtol=0, atol=tol)
            smoothed += 1
    assert smoothed == 12 - filt.lag


@pytest.mark.parametrize("kw", [dict(infl=1.02), dict(prior="N", xN=2.0), dict(variant="bundle", infl=1.02)])
def test_ienkf_is_the_ienks_of_lag_one(kw):
    """On Lorenz 96 (nonlinear, several Gauss-Newton iterations) the IEnKS with L = 1 run by the DA loop
    gives the IEnKF's analyses exactly; its smoothed ensemble is the lag-1 smoother's, scored one cycle back."""
    a = _run(IEnKF(N=10, **kw), [0, 1], cycles=30)
    b = _run(IEnKS(N=10, lag=1, **kw), [0, 1], cycles=30)
    np.testing.assert_array_equal(a.rmse_a, b.rmse_a)
    np.testing.assert_array_equal(a.rmse_f, b.rmse_f)
    assert np.isfinite(b.rmse_s[:, :-1]).all() and np.isnan(b.rmse_s[:, -1]).all()
    assert (b.rmse_s[:, :-1] < b.rmse_a[:, :-1]).mean() > 0.6  # the smoother has the next observation too


def test_ienks_batched_equals_one_at_a_time():
    filt = IEnKS(N=10, lag=3, mda=True, prior="N", xN=2.0)
    together = _run(filt, [0, 1, 2], cycles=20)
    for b in range(3):
        alone = _run(filt, [b], cycles=20)
        np.testing.assert_allclose(together.rmse_a[b], alone.rmse_a[0], rtol=1e-12, atol=0)
        np.testing.assert_allclose(together.rmse_s[b], alone.rmse_s[0], rtol=1e-12, atol=0)


def test_ienks_tensor_hyperparameters():
    grid = _run(IEnKS(N=10, lag=2).model_copy(update={"infl": torch.tensor([1.0, 1.05], dtype=f64)}), [0, 0], cycles=20)
    for b, v in enumerate([1.0, 1.05]):
        alone = _run(IEnKS(N=10, lag=2, infl=v), [0], cycles=20)
        np.testing.assert_allclose(grid.rmse_a[b], alone.rmse_a[0], rtol=1e-12, atol=0)


def test_ienkf_refuses_a_lag():
    with pytest.raises(ValueError, match="lag 1"):
        IEnKF(lag=2)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        IEnKS(lag=0)
    with pytest.raises(ValueError, match="start/step"):
        IEnKS(lag=2).cycle(torch.zeros(1, 20, 40, dtype=f64), L96, None, None)


def _l96(filt, cycles, burn_in=200, seed=11, B=1):
    observer = Observer(Nx=40, sigma=1.0)
    twin = TwinStream(L96, observer, B, seed=seed, ids=list(range(B)))
    res = run_cycles(filt.prepare(L96, observer, f64, "cpu"), L96, twin, cycles, burn_in, seed, list(range(B)))
    assert not res.diverged.any()
    return res.scores()


@pytest.mark.slow
def test_l96_ienks_accuracy():
    """N 20, -N prior xN 2 (DAPPER's iEnKS lag 1: 0.174 over 10^4 cycles): lag 1 near it, lag 3 at least as
    good, and the smoothed (lag-L) estimate better than the filtering one."""
    s1 = _l96(IEnKS(N=20, lag=1, prior="N", xN=2.0), 1200)
    s3 = _l96(IEnKS(N=20, lag=3, prior="N", xN=2.0), 1200)
    assert 0.15 < s1["armse"] < 0.20
    assert s3["armse"] < s1["armse"] + 0.01
    assert s3["armse_s"] < s3["armse"] - 0.02
