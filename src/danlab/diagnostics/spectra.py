"""Eigenspectra of analysis covariances: the learned P^a(x) against an ensemble's P^a, per mode, time-averaged."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr


def sym_eigvals(P: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric part (P + P^T)/2, sorted in decreasing order: (..., Nx)."""
    return torch.linalg.eigvalsh(0.5 * (P + P.mT)).flip(-1)


def ensemble_covariance(E: torch.Tensor) -> torch.Tensor:
    """The ensemble covariance X^T X / (N - 1) of E (..., N, Nx): (..., Nx, Nx) (rank ≤ N - 1)."""
    X = E - E.mean(-2, keepdim=True)
    return X.mT @ X / (E.shape[-2] - 1)


def translation_rows(P: torch.Tensor) -> torch.Tensor:
    """The translation-averaged row r(p) = mean_i P[..., i, i+p] (indices mod Nx) for p = -Nx/2 .. Nx/2-1: (..., Nx)."""
    Nx = P.shape[-1]
    offsets = torch.arange(Nx) - Nx // 2
    i = torch.arange(Nx)
    return P[..., i[None, :], (i[None, :] + offsets[:, None]) % Nx].mean(-1)


def eigenspectra(P_dan: torch.Tensor, P_ens: torch.Tensor, P_dan_ls: torch.Tensor | None = None,
                 names: tuple[str, str] = ("dan", "enkf")) -> xr.Dataset:
    """Time-averaged sorted eigenvalues of the symmetric parts of P_dan (S, Nx, Nx) and P_ens (S', Nx, Nx), their ratio
    per mode (NaN where the ensemble's mean eigenvalue is 0 to round-off: an ensemble of N has rank ≤ N - 1), and the
    translation-averaged rows of both (how far the update spreads an innovation)."""
    a, e = names
    ev_d, ev_e = sym_eigvals(P_dan), sym_eigvals(P_ens)
    md, me = ev_d.mean(0), ev_e.mean(0)
    tiny = 1e-10 * float(me.abs().max())
    ratio = torch.where(me > tiny, md / me.clamp(min=tiny), torch.full_like(md, float("nan")))
    Nx = P_dan.shape[-1]
    mode, off = ("mode",), ("offset",)
    u = "state units^2"
    ds = xr.Dataset(
        {f"eig_{a}": (mode, md.numpy(), {"long_name": f"time-averaged sorted eigenvalues of P^a ({a}, Jacobian)", "units": u}),
         f"eig_{a}_std": (mode, ev_d.std(0).numpy() if ev_d.shape[0] > 1 else np.zeros(Nx), {"units": u}),
         f"eig_{e}": (mode, me.numpy(), {"long_name": f"time-averaged sorted eigenvalues of P^a ({e})", "units": u}),
         f"eig_{e}_std": (mode, ev_e.std(0).numpy() if ev_e.shape[0] > 1 else np.zeros(Nx), {"units": u}),
         "eig_ratio": (mode, ratio.numpy(), {"long_name": f"eig_{a} / eig_{e} per mode", "units": "1"}),
         f"pa_row_{a}": (off, translation_rows(P_dan).mean(0).numpy(),
                         {"long_name": f"translation-averaged row P^a[i, i+offset] ({a})", "units": u}),
         f"pa_row_{e}": (off, translation_rows(P_ens).mean(0).numpy(),
                         {"long_name": f"translation-averaged row P^a[i, i+offset] ({e})", "units": u})},
        coords={"mode": np.arange(1, Nx + 1), "offset": np.arange(Nx) - Nx // 2})
    if P_dan_ls is not None:
        ds[f"eig_{a}_ls"] = (mode, sym_eigvals(P_dan_ls).mean(0).numpy(),
                             {"long_name": f"time-averaged sorted eigenvalues of P^a ({a}, least squares)", "units": u})
    return ds
