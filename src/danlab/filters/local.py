"""Localisation: the LETKF (local ETKF, and its local EnKF-N variant) with Gaspari–Cohn tapering of R^-1.

Notation as in ensemble.py: E (B, N, Nx) ensemble, x̄ its mean, X = (E - x̄)/sqrt(N-1), S = H X R^-1/2,
d = R^-1/2 (y - H x̄). Distances come from the model when it has them (`model.distances()`: great-circle
distances in km between the grid points of QG on the sphere); otherwise sites lie on a periodic 1-D grid
(Lorenz 96, Kuramoto–Sivashinsky) and the distance between sites i and j is min(|i - j|, Nx - |i - j|), in sites.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from danlab.filters.base import apply_sym, flag_rows, mean_and_anomalies, safe_eigh, zero_bad_rows
from danlab.filters.ensemble import InflatedEnsembleFilter, dual_inflation, hyperprior
from danlab.observations import Obs
from danlab.rng import BatchRNG


def gaspari_cohn(r: torch.Tensor) -> torch.Tensor:
    """The Gaspari & Cohn (1999, eq. 4.10) fifth-order piecewise rational taper of r = distance / c, c the
    half-width: 1 at r = 0, compactly supported (0 for r >= 2), C^2 (a valid correlation function in up to 3-D).

    DAPPER's `loc_rad` is c / 1.82 (it scales the taper to exp(-1/2) at distance loc_rad)."""
    r = r.abs()
    r1 = r.clamp(max=1.0)
    inner = (((-0.25 * r1 + 0.5) * r1 + 0.625) * r1 - 5.0 / 3.0) * r1**2 + 1.0
    r2 = r.clamp(min=1.0, max=2.0)  # the clamp keeps 1/r finite where this branch is not used
    outer = ((((r2 / 12.0 - 0.5) * r2 + 0.625) * r2 + 5.0 / 3.0) * r2 - 5.0) * r2 + 4.0 - 2.0 / (3.0 * r2)
    return torch.where(r <= 1.0, inner, torch.where(r < 2.0, outer, torch.zeros_like(r)))


def periodic_distances(Nx: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(Nx, Nx) distances between the sites of a periodic 1-D grid, in sites."""
    i = torch.arange(Nx, device=device)
    d = (i[:, None] - i[None, :]).abs()
    return torch.minimum(d, Nx - d).to(dtype)


def block_distances(Nx: int, block: int = 1, dtype=torch.float64, device="cpu",
                    dist: torch.Tensor | None = None) -> torch.Tensor:
    """(Nx/block, Nx) distances from each block of `block` consecutive sites to every site: the mean of the
    distances from the block's sites (DAPPER's batches). `dist` (Nx, Nx): the site-to-site distances (default:
    `periodic_distances`); block 1: `dist` itself."""
    dist = periodic_distances(Nx, dtype, device) if dist is None else dist.to(dtype=dtype, device=device)
    return dist.view(Nx // block, block, Nx).mean(-2)


def localisation(Nx: int, radius, like: torch.Tensor, taper: str = "gc", block: int = 1,
                 dist: torch.Tensor | None = None) -> torch.Tensor:
    """rho[b, j] (1 or B, Nx/block, Nx): the weight of the observation at site j in the analysis of block b, for
    the half-width `radius` (a float or a (B,) tensor, in the unit of `dist`: sites of a periodic 1-D grid by
    default), in the dtype and on the device of `like`."""
    dist = block_distances(Nx, block, like.dtype, like.device, dist).unsqueeze(0)
    c = radius.to(like).view(-1, 1, 1) if isinstance(radius, torch.Tensor) else radius
    if taper == "gc":
        return gaspari_cohn(dist / c)
    return (dist <= c).to(like.dtype)  # "step": every observation within the radius, with full weight


class LETKF(InflatedEnsembleFilter):
    """Local ETKF (Hunt, Kostelich & Szunyogh 2007): one analysis per site i, in ensemble space, from the
    observations weighted by the taper rho_ij (R^-1 localisation: R_i^-1 = diag(rho_i) R^-1, Gaspari–Cohn of
    half-width `radius` sites by default). At site i, with S_i = S diag(rho_i)^1/2 and d_i = diag(rho_i)^1/2 d:

        w_i = (I + S_i S_i^T)^-1 S_i d_i,   T_i = (I + S_i S_i^T)^-1/2,
        E^a[:, i] = x̄_i + X[:, i]^T w_i + sqrt(N-1) T_i X[:, i].

    The N x N matrices S_i S_i^T = sum_j rho_ij s_j s_j^T (s_j the column j of S) of all the sites come at once
    as rho @ (s_j s_j^T)_j: one matrix product, then one batched eigendecomposition of B x Nx small matrices.
    With `block` > 1, blocks of that many consecutive sites share one local analysis (w, T), the taper measured
    by the mean distance from the block's sites, as DAPPER's batches: `block` times fewer eigendecompositions
    (the cost of the LETKF here; DAPPER's Kuramoto–Sivashinsky setup uses blocks of 4).
    Inflation `infl` multiplies the forecast anomalies, as in the ETKF here (DAPPER inflates after the analysis).
    On a model with `distances()` (QG on the sphere) the taper is in great-circle distance and `radius` is in
    km; blocks of consecutive grid points then lie along a latitude row.

    prior "N": the local EnKF-N. At every site the finite-size prior's inflation is estimated from the local
    problem (the dual cost of `ensemble.EnKF_N`, hyperprior scaled by `xN`), then the local ETKF update of the
    inflated ensemble is done, as EnKF_N does globally; `infl` is applied too if not 1.

    With taper "step" and a radius of at least Nx/2 every site sees every observation with weight 1: the LETKF is
    then the ETKF, and the local EnKF-N the EnKF-N, exactly.

    radius and infl (and xN) may be (B,) tensors, one value per experiment (`danlab tune`). Published (DAPPER,
    bocquet2019 settings, Kuramoto–Sivashinsky Nx 128, Δt 1, H = I, R = I; DAPPER's loc_rad x 1.82 = radius here):
    N 16, radius 51, inflation 1.02: 0.11; N 6, radius 25, 1.06: 0.14; N 4, radius 15, 1.11: 0.18 (block 4,
    inflation after the analysis, random rotations). Measured here (block 4, tuned on other seeds, 10^4 cycles;
    docs/results/ks_baselines.md): N 16 (radius 51, 1.02) 0.112; N 6 (radius 15, 1.06) 0.142; N 4 (radius 15, 1.16)
    0.178; the local EnKF-N, N 6, radius 15, no inflation: 0.146. Lorenz 96 (Nx 40), N 10, radius 7.3, 1.04: 0.215.
    """

    method: Literal["letkf"] = "letkf"
    radius: float = Field(10.0, gt=0, description="localisation half-width in sites, or in km on a model with "
                          "great-circle distances (QG on the sphere) (Gaspari–Cohn: zero beyond 2 × radius); "
                          "DAPPER's loc_rad × 1.82")
    taper: Literal["gc", "step"] = Field("gc", description='"gc": Gaspari–Cohn; "step": weight 1 up to radius, 0 beyond')
    prior: Literal["infl", "N"] = Field("infl", description='"infl": local ETKF with inflation infl; "N": local '
                                        'EnKF-N (inflation estimated at every site)')
    xN: float = Field(1.0, gt=0, description='hyperprior confidence of the "N" prior (as in EnKF_N)')
    block: int = Field(1, ge=1, description="sites analysed together: blocks of this many consecutive sites share "
                       "one local analysis, the taper measured by the mean distance from the block (must divide Nx)")
    dist: torch.Tensor | None = Field(None, exclude=True, description="(Nx, Nx) distances between the state "
                                      "variables, set by prepare() from the model's distances() (None: a periodic "
                                      "1-D grid, in sites)")
    tunable: ClassVar[tuple[str, ...]] = ("infl", "radius", "xN")

    def prepare(self, model, observer, dtype, device) -> "LETKF":
        if model.Nx % self.block:
            raise ValueError(f"filter.block must divide model.Nx = {model.Nx} (got {self.block})")
        if hasattr(model, "distances"):
            return self.model_copy(update={"dist": model.distances().to(dtype=dtype, device=device)})
        return self

    def update(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        B, N, Nx = E.shape
        nb, k = Nx // self.block, self.block
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma  # (B, N, Nx)
        d = obs.innovation(xb) / obs.sigma  # (B, Nx)
        rho = localisation(Nx, self.radius, E, self.taper, k, self.dist)  # (B or 1, nb, Nx)
        outer = (S.mT.unsqueeze(-1) * S.mT.unsqueeze(-2)).reshape(B, Nx, N * N)  # s_j s_j^T, (B, Nx, N*N)
        G = (rho @ outer).view(B * nb, N, N)  # S_i S_i^T for every block i
        Sd = (rho @ (S * d.unsqueeze(-2)).mT).view(B * nb, N, 1)  # S_i d_i
        lam, V, ok = safe_eigh(G)
        ok, Sd = zero_bad_rows(ok, Sd)
        lam = lam.clamp(min=0)
        Xi = X.view(B, N, nb, k).permute(0, 2, 1, 3).reshape(B * nb, N, k)  # each block's anomalies
        if self.prior == "N":  # local EnKF-N: the inflation u_i of each block's prior anomalies, estimated
            xN = self.xN.repeat_interleave(nb) if isinstance(self.xN, torch.Tensor) else self.xN
            eps, c = hyperprior(lam, N, xN)
            u = dual_inflation(lam, (V.mT @ Sd).squeeze(-1) ** 2 / (N - 1), eps, c)  # (B nb, 1)
            a = lam * u + 1
            w = u.sqrt().unsqueeze(-1) * (apply_sym(V, a.reciprocal()) @ Sd)
            Xi = u.sqrt().unsqueeze(-1) * Xi
        else:
            a = lam + 1
            w = apply_sym(V, a.reciprocal()) @ Sd
        T = apply_sym(V, a.rsqrt())
        xa = xb + (w.mT @ Xi).view(B, Nx)
        A = (T @ Xi).view(B, nb, N, k).permute(0, 2, 1, 3).reshape(B, N, Nx)
        return flag_rows(ok.view(B, nb).all(-1), xa.unsqueeze(-2) + math.sqrt(N - 1) * A)
