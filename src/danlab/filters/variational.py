"""Variational analyses with a static, climatological background covariance: 3D-Var, and strong-constraint
4D-Var over a window of L cycles (Gauss-Newton, tangent-linear and adjoint models by autograd).

Notation: x^f the forecast (a single state, N = 1), B = scale * C the static background covariance, C the
climatological covariance of the model, R = sigma^2 I. Observations are in state-space mask form (see
observations.py): with the 0/1 mask m, H B H^T + R restricted to the observed sites is the matrix
A = diag(m) B diag(m) + diag(sigma^2 m + (1 - m)), whose unobserved rows and columns are those of the
identity, so the solution z of A z = y - H x^f (zero where unobserved) is exactly (H B H^T + R)^-1 (y - H x^f)
placed on the observed sites.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from danlab.filters.base import Filter, WindowFilter, flag_rows, per_batch, rows_ok, sanitise, window_run
from danlab.observations import Obs
from danlab.rng import BatchRNG, make_generator


def circulant_average(C: torch.Tensor) -> torch.Tensor:
    """The average of C over circular shifts of the sites: C_h[i, j] = mean_s C[i+s, j+s] (homogeneity)."""
    Nx = C.shape[-1]
    i = torch.arange(Nx, device=C.device)
    c = C.gather(-1, (i[:, None] + i[None, :]) % Nx).mean(-2)  # c[r] = mean_i C[i, i+r]
    return c[(i[None, :] - i[:, None]) % Nx]


def free_runs(model, trajectories: int = 16, cycles: int = 2000, seed: int = 0) -> torch.Tensor:
    """States (cycles, trajectories, Nx), float64, of `trajectories` free runs of `model` over `cycles` cycles after
    its spin-up, from seeded initial states: the samples of the climatological statistics."""
    g = make_generator(seed, "var3d/climatology")
    with torch.no_grad():
        x = model.spinup(model.initial(torch.randn(trajectories, model.Nx, generator=g, dtype=torch.float64)))
        xs = torch.empty(cycles, *x.shape, dtype=torch.float64)
        for k in range(cycles):
            x = model(x)
            xs[k] = x
    return xs


def climatology(model, trajectories: int = 16, cycles: int = 2000, seed: int = 0,
                homogeneous: bool = True) -> torch.Tensor:
    """Climatological covariance (Nx, Nx), float64, of the free runs of `free_runs`; averaged over circular
    shifts if homogeneous."""
    X = free_runs(model, trajectories, cycles, seed).reshape(-1, model.Nx)
    X = X - X.mean(0)
    C = X.mT @ X / (X.shape[0] - 1)
    return circulant_average(C) if homogeneous else C


def climatological_mean(model, trajectories: int = 16, cycles: int = 2000, seed: int = 0,
                        homogeneous: bool = True) -> torch.Tensor:
    """Climatological mean state (Nx,), float64, of the free runs of `free_runs`; the same value at every site
    (the mean over sites too) if homogeneous."""
    m = free_runs(model, trajectories, cycles, seed).reshape(-1, model.Nx).mean(0)
    return m.mean().expand(model.Nx).clone() if homogeneous else m


class FromClimatology(Filter):
    """A single-state method built on the model's climatological statistics, estimated by `prepare` from
    `clim_trajectories` free runs of `clim_cycles` cycles (seed `clim_seed`, float64), averaged over circular
    shifts of the sites when `homogeneous` (right for Lorenz 96 and Kuramoto–Sivashinsky, whose statistics are
    invariant under rotation of the sites; not for the sphere)."""

    N: int = Field(1, ge=1, description="ensemble size: a variational filter works on a single state, N = 1")
    homogeneous: bool = Field(True, description="average the climatological statistics over circular shifts")
    clim_trajectories: int = Field(16, ge=1, description="free runs for the climatological statistics")
    clim_cycles: int = Field(2000, ge=2, description="cycles of each free run")
    clim_seed: int = Field(0, description="seed of the free runs' initial states")

    @model_validator(mode="after")
    def _single_state(self):
        if self.N != 1:
            raise ValueError(f"{type(self).__name__} works on a single state: N must be 1 (got N={self.N})")
        return self

    def _check_grid(self, model) -> None:
        if self.homogeneous and hasattr(model, "distances"):  # a grid that is not a circle of sites (the sphere)
            from danlab.config import ConfigError
            raise ConfigError(f"filter.homogeneous: averaging over circular shifts of the state index needs a 1-D "
                              f"periodic grid, which {type(model).__name__}'s is not (set filter.homogeneous: false)")


class Climatology(FromClimatology):
    """Climatology: x^a = the model's climatological mean, whatever the forecast and the observations. The
    reference point of every table: a method that knows nothing of this truth scores about the climatological
    std of the state (Lorenz 96 standard 3.6, Kuramoto–Sivashinsky 32π 1.3)."""

    method: Literal["climatology"] = "climatology"
    tracks_truth: ClassVar[bool] = False
    mean: torch.Tensor | None = Field(None, exclude=True, description="the climatological mean state, (Nx,)")

    def prepare(self, model, observer, dtype, device) -> "Climatology":
        if self.mean is None:
            self._check_grid(model)
            m = climatological_mean(model, self.clim_trajectories, self.clim_cycles, self.clim_seed, self.homogeneous)
        else:
            m = self.mean
        return self.model_copy(update={"mean": m.to(dtype=dtype, device=device)})

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("Climatology used before prepare(): no climatological mean (or give mean)")
        return self.mean.to(E).expand_as(E).clone()


class StaticB(FromClimatology):
    """A filter with a static background covariance B = scale * C, C the climatological covariance of the
    model (see `FromClimatology`). It may also be given directly as `cov` (not part of the YAML configuration).
    The prepared filter is a copy holding C in `cov`. It works on a single state, N = 1."""

    scale: float = Field(0.0175, gt=0, description="B = scale * climatological covariance")
    cov: torch.Tensor | None = Field(None, exclude=True, description="the climatological covariance C, (Nx, Nx)")
    tunable: ClassVar[tuple[str, ...]] = ("scale",)

    @model_validator(mode="after")
    def _square_cov(self):
        if self.cov is not None and (self.cov.dim() != 2 or self.cov.shape[0] != self.cov.shape[1]):
            raise ValueError(f"{type(self).__name__}.cov must be a square (Nx, Nx) matrix (got shape {tuple(self.cov.shape)})")
        return self

    def prepare(self, model, observer, dtype, device) -> "StaticB":
        if self.cov is not None:
            return self.model_copy(update={"cov": self.cov.to(dtype=dtype, device=device)})
        self._check_grid(model)
        C = climatology(model, self.clim_trajectories, self.clim_cycles, self.clim_seed, self.homogeneous)
        return self.model_copy(update={"cov": C.to(dtype=dtype, device=device)})

    def background_cov(self, E: torch.Tensor) -> torch.Tensor:
        """B = scale * C, (B or 1, Nx, Nx), for the single-state ensemble E (B, 1, Nx)."""
        if self.cov is None:
            raise RuntimeError(f"{type(self).__name__} used before prepare(): no background covariance (or give cov)")
        if E.shape[-2] != 1:
            raise ValueError(f"{type(self).__name__} works on a single state: got an ensemble of {E.shape[-2]} members")
        return per_batch(self.scale, E) * self.cov.to(E)


class Var3D(StaticB):
    """3D-Var: x^a = x^f + B H^T (H B H^T + R)^-1 (y - H x^f), exactly (linear H), with B = scale * C (see
    `StaticB`).

    scale: the default is the value tuned on Lorenz 96 standard (Nx 40, F 8, Δt 0.05, H = I, R = I):
    over 0.008..0.03 (4 experiments x 3000 cycles) the best is 0.0175, aRMSE 0.405 ± 0.004; 0.015 and
    0.02 are within 0.003 of it, 0.0125 and 0.025 0.016 worse, 0.01 (0.47) and 0.03 (0.44) clearly worse.
    (DAPPER's Var3D(xB=0.02) gives 0.41 on this setup.)
    """

    method: Literal["var3d"] = "var3d"

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        Pb = self.background_cov(E)
        x, m = E[:, 0], obs.mask
        d, Nx = obs.innovation(x), x.shape[-1]
        # The system is solved on the k sites observed by the fullest row only (observed sites first, in order;
        # a row with fewer pads with unobserved sites, whose rows of A are the identity's): k^3 instead of Nx^3,
        # 500x less for 256 of 2048 sites on the sphere. When some row observes every site, the full system.
        k = int(m.sum(-1).max())
        HPbHt = Pb
        if k < Nx:
            sites = torch.sort(m, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
            m, d = m.gather(-1, sites), d.gather(-1, sites)
            Pb = Pb.expand(x.shape[0], -1, -1).gather(-1, sites.unsqueeze(-2).expand(-1, Nx, -1))  # B H^T (B, Nx, k)
            HPbHt = Pb.gather(-2, sites.unsqueeze(-1).expand(-1, -1, k))
        A = m.unsqueeze(-1) * HPbHt * m.unsqueeze(-2) + torch.diag_embed(obs.sigma**2 * m + (1 - m))
        z = torch.cholesky_solve(d.unsqueeze(-1), torch.linalg.cholesky(A))
        return (x + (Pb @ (m.unsqueeze(-1) * z)).squeeze(-1)).unsqueeze(-2)


def _observed_run(model, x: torch.Tensor, obs: tuple[Obs, ...], used: list[tuple[int, float]]):
    """x run through the window: (the states at every observation time, the normalised, weighted
    innovations sqrt(beta_l) R^-1/2 (y_l - H x_l) of the observations used, concatenated)."""
    run = window_run(model, x, len(obs))
    return run, torch.cat([obs[l].innovation(run[l]) * (sb / obs[l].sigma) for l, sb in used], -1)


def observation_jacobian(model, x0: torch.Tensor, obs: tuple[Obs, ...], used: list[tuple[int, float]]):
    """x0 (B, Nx) run through the window: (the states at every observation time, the normalised, weighted
    innovations d = sqrt(beta_l) R^-1/2 (y_l - H M_l(x0)) of the observations used (B, n), and their Jacobian
    dd/dx0 (B, n, Nx)). The Jacobian comes from the adjoint of the model applied to the n unit vectors of the
    observation space (reverse-mode autograd through the integration, n copies of x0 at once)."""
    n = sum(ob.y.shape[-1] for ob in (obs[l] for l, _ in used))
    with torch.enable_grad():
        z = x0.detach().unsqueeze(-2).expand(-1, n, -1).contiguous().requires_grad_(True)
        run, d = _observed_run(model, z, obs, used)
        (J,) = torch.autograd.grad(d, z, torch.eye(n, dtype=d.dtype, device=d.device).expand_as(d))
    return [x[:, 0].detach() for x in run], d[:, 0].detach(), J


class Var4D(WindowFilter, StaticB):
    """Strong-constraint 4D-Var over a window of `lag` cycles, shifted by `shift` (SDA or MDA: see `base.WindowFilter`),
    with the static B = scale * C of `StaticB`, cycled: the background at the window start is the previous
    window's analysis run one cycle by the model.

    Incremental Gauss-Newton in the control variable w (x_{k-L} = x^b + B^1/2 w, B^1/2 = sqrt(scale) chol C):

        J(w) = 1/2 |w|^2 + sum_l beta_l/2 |R^-1/2 (y_{k-L+l} - H M_l(x^b + B^1/2 w))|^2.

    Each outer iteration linearises the model about the current trajectory: G = R^-1/2 H M_l' B^1/2 comes from
    the adjoint model applied to every observation-space unit vector, by reverse-mode autograd through the
    model's integration (`observation_jacobian`: no hand-written adjoint; 7x faster here than forward mode on
    the Nx columns of B^1/2), the gradient is w - G^T d and the incremental (quadratic) problem, with the
    Gauss-Newton Hessian I + G^T G, is solved exactly by Cholesky. Iterations stop, row by row, when
    |dw| < `tol` or after `max_iter`; rows that stop at `max_iter` with |dw| >= tol are counted, per
    experiment, as unconverged (the DA loop reports the count); a row whose linear algebra fails is flagged
    diverged. Cost per outer iteration: one run of n copies of the state through the window and its adjoint,
    n the number of observations assimilated (Nx for SDA with H = I).

    The model must be differentiable by autograd (checked by `prepare`).
    """

    autograd: ClassVar[bool] = True
    method: Literal["var4d"] = "var4d"
    N: int = Field(1, ge=1, description="ensemble size: 4D-Var works on a single state, N = 1")
    max_iter: int = Field(10, ge=1, description="maximum number of outer (Gauss-Newton) iterations")
    tol: float = Field(1e-4, ge=0, description="stop when |dw| < tol (w in units of the background std)")

    def prepare(self, model, observer, dtype, device) -> "Var4D":
        x = torch.full((1, 1, model.Nx), 1.0, dtype=dtype, device=device)
        try:
            with torch.enable_grad():
                z = x.requires_grad_(True)
                torch.autograd.grad(model(z).sum(), z)
        except Exception as exc:  # any failure of the autograd transform
            raise ValueError(f"var4d needs a model differentiable by autograd ({type(model).__name__}: "
                             f"{type(exc).__name__}: {exc})") from None
        return super().prepare(model, observer, dtype, device)

    def window_analysis(self, E: torch.Tensor, model, obs: tuple[Obs, ...], weights: list[float]):
        Pb = self.background_cov(E).expand(E.shape[0], -1, -1)
        Bh, info = torch.linalg.cholesky_ex(Pb)  # B^1/2, (B, Nx, Nx)
        ok = info == 0
        B_, _, Nx = E.shape
        xb = E[:, 0]
        used = [(l, math.sqrt(b)) for l, b in enumerate(weights) if b > 0]
        w = E.new_zeros(B_, Nx)
        r = torch.arange(B_, device=E.device)  # the rows still iterating
        Ef = None
        eye = torch.eye(Nx, dtype=E.dtype, device=E.device)
        for it in range(self.max_iter):
            o = obs if r.numel() == B_ else tuple(ob.select(r) for ob in obs)
            x0 = xb[r] + (Bh[r] @ w[r].unsqueeze(-1)).squeeze(-1)
            run, d, J = observation_jacobian(model, x0, o, used)
            if it == 0:
                Ef = run[-1].unsqueeze(-2)
            G = -Bh[r].mT @ J.mT  # (b, Nx, n): G^T = -(dd/dw)^T, rows the columns of B^1/2
            grad = G @ d.unsqueeze(-1) - w[r].unsqueeze(-1)  # -dJ/dw
            Hs = G @ G.mT + eye
            ok_r = rows_ok(Hs, grad)
            Lh, info = torch.linalg.cholesky_ex(torch.where(ok_r.view(-1, 1, 1), Hs, eye))  # a bad row: solved as I
            ok[r] = ok[r] & ok_r & (info == 0)
            dw = torch.cholesky_solve(sanitise(ok[r], grad), Lh).squeeze(-1)
            w[r] = w[r] + dw
            r = r[dw.norm(dim=-1) >= self.tol]
            if r.numel() == 0:
                break
        converged = torch.ones(B_, dtype=torch.bool, device=E.device)
        converged[r] = False  # still iterating after max_iter
        x0a = flag_rows(ok, xb + (Bh @ w.unsqueeze(-1)).squeeze(-1)).unsqueeze(-2)
        return Ef, x0a, window_run(model, x0a, len(obs)), converged
