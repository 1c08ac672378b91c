"""Sensitivity maps (the reference work's eq. 12): how P^a(x) depends on the state x, and how far from a site it looks.

The third-order tensor T[i, j, k] = ∂²a_i/∂ζ_j∂x_k at ζ = 0 = ∂P^a_ij/∂x_k says how the gain that the innovation at
site j has on the increment at site i changes with the state at site k. Lorenz 96 and a circular CNN are
translation invariant, so T is averaged over translations (C : T): S(p, q) = mean_i T[i, i+p, i+q] (indices mod Nx),
a map over (innovation offset p, state offset q), then over time. Two maps: the mean of S (signed) and the mean of
|T| taken the same way (what cancels in the signed mean still counts as looking there). The spatial extent is the
smallest Chebyshev radius max(|p|, |q|) ≤ r holding 95 % of the absolute map.

T is computed two ways: from the exact Jacobian (forward-over-forward autograd), and as ∇_x of the least-squares
P^a(x) of eqs. 9-11 (the sampled innovations held fixed, autograd through the fit).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch.func import jacfwd

from danlab.diagnostics.expansion import AnalysisMap, ls_fit


def sensitivity_tensor(amap: AnalysisMap, x: torch.Tensor) -> torch.Tensor:
    """T[i, j, k] = ∂²a_i / ∂ζ_j ∂x_k at ζ = 0 for one state x (Nx,): (Nx, Nx, Nx)."""
    zero = torch.zeros_like(x)
    P = lambda xs: jacfwd(lambda z: amap(xs, z))(zero)  # noqa: E731
    return jacfwd(P)(x)


def sensitivity_tensor_ls(amap: AnalysisMap, x: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
    """T_ls[i, j, k] = ∂P^a_ls[i, j]/∂x_k for one state x (Nx,) with the least-squares P^a over the fixed samples
    ζ (Np, Nx): (Nx, Nx, Nx)."""
    zeta = zeta.to(x.dtype)
    P = lambda xs: ls_fit(amap(xs.expand(zeta.shape[0], -1), zeta), zeta)[0]  # noqa: E731
    return jacfwd(P)(x)


def translation_average(T: torch.Tensor) -> torch.Tensor:
    """S(p, q) = mean_i T[..., i, i+p, i+q] (indices mod Nx), p and q in -Nx/2 .. Nx/2-1: (..., Nx, Nx)."""
    Nx = T.shape[-1]
    off = torch.arange(Nx) - Nx // 2
    i = torch.arange(Nx)
    j = (i[None, None, :] + off[:, None, None]) % Nx  # (p, 1, i)
    k = (i[None, None, :] + off[None, :, None]) % Nx  # (1, q, i)
    return T[..., i[None, None, :], j, k].mean(-1)


def extent(M, frac: float = 0.95) -> int:
    """The smallest r such that the entries with Chebyshev offset max(|p|, |q|, ...) ≤ r hold `frac` of Σ |M|.
    M: a map over centred offsets (each axis -n/2 .. n/2-1), any number of axes."""
    A = np.abs(np.asarray(M, dtype=np.float64))
    grids = np.meshgrid(*[np.abs(np.arange(n) - n // 2) for n in A.shape], indexing="ij")
    cheb = np.max(np.stack(grids), 0)
    total = A.sum()
    if total == 0:
        return 0
    for r in range(int(cheb.max()) + 1):
        if A[cheb <= r].sum() >= frac * total * (1 - 1e-12):
            return r
    return int(cheb.max())


def sensitivity_maps(amap: AnalysisMap, x: torch.Tensor, *, zeta: torch.Tensor | None = None, frac: float = 0.95,
                     cycles=None) -> xr.Dataset:
    """Translation- and time-averaged sensitivity maps at the states x (S, Nx): sens_mean (signed) and sens_abs
    (of |T|), over (offset_zeta p, offset_x q); with `zeta` (S, Np, Nx), also sens_ls_mean/sens_ls_abs from the
    least-squares P^a. attrs: extent (sites) of each absolute map, and the relative difference of the two estimates."""
    S, Nx = x.shape
    sm, sa, lm, la = [], [], [], []
    for s in range(S):
        T = sensitivity_tensor(amap, x[s]).detach()
        sm.append(translation_average(T))
        sa.append(translation_average(T.abs()))
        if zeta is not None:
            TL = sensitivity_tensor_ls(amap, x[s], zeta[s]).detach()
            lm.append(translation_average(TL))
            la.append(translation_average(TL.abs()))
    dims = ("offset_zeta", "offset_x")
    u = "state units"
    mean, ab = torch.stack(sm).mean(0), torch.stack(sa).mean(0)
    ds = xr.Dataset(
        {"sens_mean": (dims, mean.numpy(), {"long_name": "⟨mean_i ∂P^a[i, i+p]/∂x[i+q]⟩ (exact Jacobian)", "units": u}),
         "sens_abs": (dims, ab.numpy(), {"long_name": "⟨mean_i |∂P^a[i, i+p]/∂x[i+q]|⟩ (exact Jacobian)", "units": u})},
        coords={"offset_zeta": ("offset_zeta", np.arange(Nx) - Nx // 2, {"long_name": "innovation site - analysed site p"}),
                "offset_x": ("offset_x", np.arange(Nx) - Nx // 2, {"long_name": "state site - analysed site q"})},
        attrs={"snapshots": S, "extent_frac": frac, "extent": extent(ab.numpy(), frac), "extent_mean": extent(mean.numpy(), frac),
               "extent_x": extent(ab.sum(0).numpy(), frac), "extent_zeta": extent(ab.sum(1).numpy(), frac),
               "snapshot_cycles": np.asarray(cycles if cycles is not None else np.arange(S), dtype=np.int64)})
    if zeta is not None:
        lmean, lab = torch.stack(lm).mean(0), torch.stack(la).mean(0)
        ds["sens_ls_mean"] = (dims, lmean.numpy(), {"long_name": "as sens_mean, from ∇_x of the least-squares P^a", "units": u})
        ds["sens_ls_abs"] = (dims, lab.numpy(), {"long_name": "as sens_abs, from ∇_x of the least-squares P^a", "units": u})
        ds.attrs["ls_snapshots"] = len(lm)
        ds.attrs["ls_extent"] = extent(lab.numpy(), frac)
        ref_m = torch.stack(sm[:len(lm)]).mean(0)
        ds.attrs["ls_vs_jacobian"] = float((lmean - ref_m).norm() / ref_m.norm())
    return ds
