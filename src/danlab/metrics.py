"""Time-averaged scores with confidence intervals corrected for autocorrelation."""

from __future__ import annotations

import math

import numpy as np


def rmse(x: "torch.Tensor", truth: "torch.Tensor") -> "torch.Tensor":
    """Spatial RMSE over the last axis."""
    return (x - truth).pow(2).mean(-1).sqrt()


def integrated_autocorr_time(series: np.ndarray, c: float = 5.0) -> float:
    """Integrated autocorrelation time tau = 1 + 2 sum_t rho(t), with Sokal's automatic window
    (the smallest W with W >= c * tau(W)). tau >= 1; 1 for white noise."""
    x = np.asarray(series, dtype=np.float64)
    n = x.size
    if n < 4 or not np.all(np.isfinite(x)):
        return float("nan") if n >= 4 else 1.0
    x = x - x.mean()
    var = x @ x / n
    if var == 0:
        return 1.0
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n] / (n * var)
    tau = 1.0
    for W in range(1, n):
        tau += 2.0 * acf[W]
        if W >= c * tau:
            break
    return max(tau, 1.0)


def mean_with_ci(series: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Time mean of one series and the half-width of its (95 %) confidence interval."""
    x = np.asarray(series, dtype=np.float64)
    n = x.size
    m = float(x.mean())
    if n < 4:
        return m, float("nan")
    tau = integrated_autocorr_time(x)
    return m, z * math.sqrt(x.var(ddof=1) * tau / n)


def combine_ci(means: np.ndarray, halfwidths: np.ndarray) -> tuple[float, float]:
    """Mean over independent experiments and its confidence half-width."""
    means, hw = np.asarray(means, float), np.asarray(halfwidths, float)
    if means.size == 0:
        return float("nan"), float("nan")
    return float(means.mean()), float(np.sqrt(np.sum(hw**2)) / means.size)


def energy_score(E: "torch.Tensor", x: "torch.Tensor", eps: float = 1e-12) -> "torch.Tensor":
    """The fair (unbiased in the ensemble size) energy score of the ensembles E (B, N, Nx) against the truths
    x (B, Nx), per trajectory (B,), in RMSE units (norms divided by sqrt(Nx)):

        ES = 1/N Σ_n |E_n - x| - 1/(2 N (N - 1)) Σ_n,m |E_n - E_m|.

    A proper score (Gneiting & Raftery 2007): its expectation is smallest when the members are drawn from the
    distribution of the truth, so it rewards a spread that matches the error, where the members' mean squared error
    rewards collapse. Differentiable everywhere: each norm is sqrt(mean² + eps) - sqrt(eps), eps in squared state
    units, which is 0 at 0 and within sqrt(eps) of the norm elsewhere."""
    N = E.shape[-2]
    if N < 2:
        raise ValueError(f"the energy score needs an ensemble of N >= 2 members (got N {N})")
    norm = lambda d: (d.pow(2).mean(-1) + eps).sqrt() - eps ** 0.5
    pair = norm(E.unsqueeze(-2) - E.unsqueeze(-3))  # (B, N, N), 0 on the diagonal
    return norm(E - x.unsqueeze(-2)).mean(-1) - pair.sum((-2, -1)) / (2 * N * (N - 1))


def crps(E: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
    """The fair continuous ranked probability score of the ensembles E (B, N, Nx) against the truths x (B, Nx), per
    site then averaged over the sites, per trajectory (B,):

        CRPS_i = 1/N Σ_n |E_ni - x_i| - 1/(2 N (N - 1)) Σ_n,m |E_ni - E_mi|.

    Proper for each site's marginal (Ferro 2014 for the fair form); blind to the correlations between sites."""
    import torch

    N = E.shape[-2]
    if N < 2:
        raise ValueError(f"the CRPS needs an ensemble of N >= 2 members (got N {N})")
    skill = (E - x.unsqueeze(-2)).abs().mean(-2)
    # Σ_n,m |E_n - E_m| over sorted members: Σ_k (2k - N + 1) E_(k), k = 0..N-1 (no (N, N) pairs, an exact identity)
    w = 2 * torch.arange(N, dtype=E.dtype, device=E.device) - (N - 1)
    pair = 2 * (E.sort(-2).values * w.unsqueeze(-1)).sum(-2)
    return (skill - pair / (2 * N * (N - 1))).mean(-1)


def rank_counts(E: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
    """The rank of each truth x (B, Nx) among its ensemble's members E (B, N, Nx): how many members lie below
    it, 0..N, (B, Nx) integers. Counted over cycles and sites, a flat histogram says that the truth is
    indistinguishable from a member (a calibrated ensemble); a U shape, too little spread."""
    return (E < x.unsqueeze(-2)).sum(-2)
