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
