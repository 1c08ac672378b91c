"""The operator expansion of a learned analysis: a_θ(x, ζ) ≈ a_θ(x, 0) + P^a(x) ζ, with ζ = H^T R^-1 δ.

With a single state the analysis is x^a = x^f + a_θ(x^f, ζ). If a_θ behaves like a Kalman update, then
a_θ(x, 0) ≈ 0 (no increment without an innovation) and the increment is linear in ζ with a matrix P^a(x) that
plays the part of the analysis error covariance (x^a = x^f + P^a H^T R^-1 δ; with H = I, R = I, P^a is also the
gain K(x)). Two estimates of P^a(x):

- least squares over N_p sampled innovations δ_j ~ N(0, s^2 R) (the reference work's eqs. 9-11): with
  ζ_j = H^T R^-1 δ_j and a_j = a_θ(x, ζ_j), regress the centred a_j on the centred ζ_j,
  P^a = argmin_P Σ_j ‖(a_j - ā) - P (ζ_j - ζ̄)‖²; the relative residual of that fit measures how far a_θ is
  from linear in ζ at the scale s of the sampled innovations;
- the exact Jacobian ∂a_θ/∂ζ at ζ = 0, by forward-mode autograd.

Here ζ is probed on every site (H = I, R = σ² I): P^a is then identifiable in full.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xarray as xr
from torch.func import jacfwd, vmap

AnalysisMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def net_map(net: torch.nn.Module) -> AnalysisMap:
    """The analysis map a(x, ζ) of a trained network run with a single state (Ne = 1): x, ζ (..., Nx) -> (..., Nx).

    Inputs are cast to the network's dtype and the increment back to the input's dtype; the network's
    parameters are frozen (the diagnostics differentiate with respect to x and ζ only)."""
    p = next(net.parameters())
    for q in net.parameters():
        q.requires_grad_(False)

    def a(x: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
        x, zeta = torch.broadcast_tensors(x, zeta)
        Nx = x.shape[-1]
        out = net(x.reshape(-1, 1, Nx).to(p.dtype), zeta.reshape(-1, Nx).to(p.dtype))
        return out.reshape(x.shape).to(x.dtype)

    return a


def _chunks(n: int, size: int):
    for i in range(0, n, max(size, 1)):
        yield slice(i, min(i + size, n))


def zero_innovation_response(amap: AnalysisMap, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """b_k = ‖a(x_k, 0)‖ / √Nx for each state x_k of x (K, Nx): the increment without any innovation, (K,)."""
    Nx = x.shape[-1]
    with torch.no_grad():
        out = [amap(x[s], torch.zeros_like(x[s])).norm(dim=-1) / Nx**0.5 for s in _chunks(x.shape[0], chunk)]
    return torch.cat(out)


def pa_jacobian(amap: AnalysisMap, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """P[s, i, j] = ∂a_i/∂ζ_j (x_s, ζ = 0) for x (S, Nx), by forward-mode autograd; (S, Nx, Nx)."""
    jac = vmap(jacfwd(lambda xs, z: amap(xs, z), argnums=1))
    return torch.cat([jac(x[s], torch.zeros_like(x[s])) for s in _chunks(x.shape[0], chunk)])


def sample_innovations(S: int, n_samples: int, Nx: int, *, sigma: float = 1.0, scale: float = 1.0,
                       generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """ζ_j = H^T R^-1 δ_j with δ_j ~ N(0, scale² σ² I) (H = I, R = σ² I), for S states: (S, n_samples, Nx)."""
    delta = scale * sigma * torch.randn(S, n_samples, Nx, generator=generator, dtype=dtype)
    return delta / sigma**2


def ls_fit(A: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares P with (A - Ā) ≈ (Z - Z̄) P^T over the samples (dim -2): A, Z (..., Np, Nx).

    Returns P (..., Nx, Nx) and the relative residual ‖(A - Ā) - (Z - Z̄) P^T‖ / ‖A - Ā‖ (...)."""
    Zc = Z - Z.mean(-2, keepdim=True)
    Ac = A - A.mean(-2, keepdim=True)
    # normal equations (Zc^T Zc) P^T = Zc^T Ac, solved by Cholesky: differentiable and batched
    G = Zc.mT @ Zc
    PT = torch.cholesky_solve(Zc.mT @ Ac, torch.linalg.cholesky(G))
    res = (Ac - Zc @ PT).flatten(-2).norm(dim=-1) / Ac.flatten(-2).norm(dim=-1).clamp(min=torch.finfo(A.dtype).tiny)
    return PT.mT, res


def pa_least_squares(amap: AnalysisMap, x: torch.Tensor, zeta: torch.Tensor, chunk: int = 8
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares P^a(x_s) of eqs. 9-11 from the sampled ζ (S, Np, Nx) at the states x (S, Nx).

    Returns P (S, Nx, Nx) and the relative residual of each fit (S,). Needs Np > Nx."""
    S, Np, Nx = zeta.shape
    if Np <= Nx:
        raise ValueError(f"least-squares P^a needs more samples than sites (N_p={Np}, Nx={Nx})")
    Ps, rs = [], []
    with torch.no_grad():
        for s in _chunks(S, chunk):
            A = amap(x[s].unsqueeze(-2).expand(-1, Np, -1), zeta[s].to(x.dtype))
            P, r = ls_fit(A, zeta[s].to(x.dtype))
            Ps.append(P)
            rs.append(r)
    return torch.cat(Ps), torch.cat(rs)


def _fro(M: torch.Tensor) -> torch.Tensor:
    return M.flatten(-2).norm(dim=-1)


def matrix_stats(P: torch.Tensor) -> dict[str, torch.Tensor]:
    """Asymmetry ‖P - P^T‖/‖P‖ and smallest eigenvalue of the symmetric part (P + P^T)/2, per matrix."""
    sym = 0.5 * (P + P.mT)
    return {"asymmetry": _fro(P - P.mT) / _fro(P), "min_eig": torch.linalg.eigvalsh(sym)[..., 0]}


def operator_expansion(amap: AnalysisMap, x: torch.Tensor, *, n_samples: int = 400, scale: float = 1.0,
                       sigma: float = 1.0, seed: int = 0, cycles=None, keep_matrices: bool = True) -> xr.Dataset:
    """Both estimates of P^a at the states x (S, Nx) (e.g. the forecasts of S cycles) and how they compare.

    Variables (dims snapshot[, row, col]): pa_jacobian, pa_ls (if keep_matrices), rel_diff = ‖P_ls - P_jac‖_F /
    ‖P_jac‖_F, ls_residual, asymmetry_* and min_eig_* for each estimate. `cycles` labels the snapshots."""
    from danlab.rng import make_generator
    S, Nx = x.shape
    P_jac = pa_jacobian(amap, x)
    zeta = sample_innovations(S, n_samples, Nx, sigma=sigma, scale=scale, generator=make_generator(seed, "analyse/ls"),
                              dtype=x.dtype)
    P_ls, res = pa_least_squares(amap, x, zeta)
    rel = _fro(P_ls - P_jac) / _fro(P_jac)
    sj, sl = matrix_stats(P_jac), matrix_stats(P_ls)
    snap = np.arange(S) if cycles is None else np.asarray(cycles)
    d = ("snapshot",)
    ds = xr.Dataset(
        {"rel_diff": (d, rel.numpy(), {"long_name": "relative Frobenius difference of the least-squares and Jacobian P^a",
                                       "units": "1"}),
         "ls_residual": (d, res.numpy(), {"long_name": "relative residual of the least-squares fit (nonlinearity in ζ)",
                                          "units": "1"}),
         "asymmetry_jacobian": (d, sj["asymmetry"].numpy(), {"long_name": "‖P - P^T‖_F / ‖P‖_F of the Jacobian P^a", "units": "1"}),
         "asymmetry_ls": (d, sl["asymmetry"].numpy(), {"long_name": "‖P - P^T‖_F / ‖P‖_F of the least-squares P^a", "units": "1"}),
         "min_eig_jacobian": (d, sj["min_eig"].numpy(), {"long_name": "smallest eigenvalue of the symmetric part of the Jacobian P^a",
                                                         "units": "state units^2"}),
         "min_eig_ls": (d, sl["min_eig"].numpy(), {"long_name": "smallest eigenvalue of the symmetric part of the least-squares P^a",
                                                   "units": "state units^2"})},
        coords={"snapshot": ("snapshot", snap, {"long_name": "cycle of the forecast state"})},
        attrs={"n_samples": n_samples, "innovation_scale": scale, "sigma": sigma, "seed": seed})
    if keep_matrices:
        m = ("snapshot", "row", "col")
        ds["pa_jacobian"] = (m, P_jac.numpy(), {"long_name": "P^a = ∂a/∂ζ at ζ = 0 (exact, autograd)", "units": "state units^2"})
        ds["pa_ls"] = (m, P_ls.numpy(), {"long_name": "P^a by least squares over sampled innovations (eqs. 9-11)",
                                         "units": "state units^2"})
        ds = ds.assign_coords(row=np.arange(Nx), col=np.arange(Nx))
    return ds


def zero_innovation_dataset(b: torch.Tensor, cycles, scored: np.ndarray) -> xr.Dataset:
    """b_k along the run and its mean b and standard deviation s over the scored cycles (attrs)."""
    bs = b.numpy()[scored]
    return xr.Dataset({"b_k": (("cycle",), b.numpy(), {"long_name": "‖a(x^f_k, 0)‖ / √Nx: the increment without innovation",
                                                         "units": "state units"})},
                      coords={"cycle": np.asarray(cycles)}, attrs={"b": float(bs.mean()), "s": float(bs.std())})
