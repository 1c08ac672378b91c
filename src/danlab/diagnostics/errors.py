"""Non-Gaussian statistics of forecast and analysis errors: skewness and excess kurtosis, pooled over sites and cycles."""

from __future__ import annotations

import numpy as np
import xarray as xr


def moments(e) -> dict[str, float]:
    """Mean, standard deviation, skewness E[(e-μ)^3]/σ^3 and excess kurtosis E[(e-μ)^4]/σ^4 - 3 of all entries of e
    (both 0 for a Gaussian)."""
    e = np.asarray(e, dtype=np.float64).ravel()
    e = e[np.isfinite(e)]
    mu = e.mean()
    c = e - mu
    var = (c * c).mean()
    sd = np.sqrt(var)
    return {"mean": float(mu), "std": float(sd), "skewness": float((c**3).mean() / sd**3),
            "excess_kurtosis": float((c**4).mean() / var**2 - 3.0), "count": int(e.size)}


def error_moments(errors: dict[str, dict[str, np.ndarray]]) -> xr.Dataset:
    """errors[filter][stage] (cycles, Nx) -> Dataset over (filter, stage) of mean, std, skewness, excess_kurtosis."""
    filters = list(errors)
    stages = list(next(iter(errors.values())))
    stats = {f: {s: moments(errors[f][s]) for s in stages} for f in filters}
    dims = ("filter", "stage")
    meta = {"mean": ("mean error", "state units"), "std": ("error standard deviation", "state units"),
            "skewness": ("skewness of the error, pooled over sites and cycles", "1"),
            "excess_kurtosis": ("excess kurtosis of the error, pooled over sites and cycles (0: Gaussian)", "1")}
    data = {k: (dims, np.array([[stats[f][s][k] for s in stages] for f in filters]), {"long_name": ln, "units": u})
            for k, (ln, u) in meta.items()}
    return xr.Dataset({f"error_{k}": v for k, v in data.items()}, coords={"filter": filters, "stage": stages})
