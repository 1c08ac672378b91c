"""Ensemble Kalman filters: stochastic EnKF, ETKF (symmetric square root), EnKF-N (finite-size).

Notation: E (B, N, Nx) ensemble, x̄ its mean, X = (E - x̄)/sqrt(N-1) the normalised anomalies,
S = H X R^-1/2 the observed anomalies, d = R^-1/2 (y - H x̄) the normalised innovation. Observations are
in state-space form (see observations.py), so every product below over the observation space is an
exact product over the observed sites.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from danlab.filters.base import (Filter, apply_sym, centred_normal, flag_rows, mean_and_anomalies, per_batch, rows_ok,
                                 safe_eigh, sanitise, sym_eig_fn, zero_bad_rows)
from danlab.observations import Obs
from danlab.rng import BatchRNG


def _inflate(E: torch.Tensor, infl) -> torch.Tensor:
    """Multiply the anomalies by infl (a float or a (B,) tensor)."""
    if not isinstance(infl, torch.Tensor) and infl == 1.0:
        return E
    xb = E.mean(-2, keepdim=True)
    return xb + per_batch(infl, E) * (E - xb)


class InflatedEnsembleFilter(Filter):
    """An ensemble filter whose forecast anomalies are inflated by `infl` before its `update`."""

    infl: float = Field(1.0, gt=0, description="multiplicative inflation of the forecast anomalies")
    tunable: ClassVar[tuple[str, ...]] = ("infl",)
    min_N: ClassVar[int] = 2

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        return self.update(_inflate(E, self.infl), obs, rng)

    def update(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        raise NotImplementedError


class EnKF(InflatedEnsembleFilter):
    """Stochastic EnKF with perturbed observations (perturbations centred over the members)."""

    method: Literal["enkf"] = "enkf"

    def update(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        N = E.shape[-2]
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma
        eps = centred_normal(E, rng)
        D = (obs.innovation(E) + obs.H(obs.sigma * eps)) / obs.sigma  # R^-1/2 (y + e_n - H E_n)
        G = S @ S.mT
        ok = rows_ok(G)  # a blown-up experiment: decomposed as the identity, then flagged (NaN) below
        C, info = torch.linalg.inv_ex(sanitise(ok, G) + torch.eye(N, dtype=E.dtype, device=E.device))
        # K D_n = X^T (S S^T + I)^-1 S D_n for each member n
        return flag_rows(ok & (info == 0), E + (D @ S.mT @ C) @ X)


class ETKF(InflatedEnsembleFilter):
    """Ensemble transform Kalman filter, symmetric square root, multiplicative inflation."""

    method: Literal["etkf"] = "etkf"

    def update(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        N = E.shape[-2]
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma
        d = obs.innovation(xb) / obs.sigma
        V, lam = sym_eig_fn(S @ S.mT, lambda l: l.clamp(min=0) + 1.0)
        w = apply_sym(V, lam.reciprocal()) @ (S @ d.unsqueeze(-1))  # (B, N, 1)
        T = apply_sym(V, lam.rsqrt())
        xa = xb + (w.mT @ X).squeeze(-2)
        return xa.unsqueeze(-2) + math.sqrt(N - 1) * (T @ X)


def hyperprior(lam: torch.Tensor, N: int, xN) -> tuple[torch.Tensor, torch.Tensor]:
    """EnKF-N hyperprior coefficients (eps_N, c_N), each (B, 1), as in DAPPER's `hyperprior_coeffs` (g = 0).

    eps_N = (N+1)/N and c_N = N/(N-1) give the Jeffreys-hyperprior EnKF-N (Bocquet 2011); the mode of the
    prior inflation is then corrected towards 1 as in eq. 36 of Bocquet, Raanes & Hannart (2015), by a
    factor that depends on how much the observations constrain the ensemble (mean of 1/(1 + lam) over the
    N eigenvalues lam of S S^T). Both are finally multiplied by xN: xN > 1 trusts the hyperprior more (more
    linear, deterministic systems), xN < 1 less, as if N were smaller. lam: a tensor, or a NumPy array (the IEnKS
    iterates in NumPy; xN then a float or a NumPy array of shape (B, 1)).
    """
    eps, c = (N + 1) / N, N / (N - 1)
    a = 1.0 + lam
    # 1/a: torch's `1.0 / a` is a.reciprocal() times 1 through a slow Python wrapper (3x the call)
    i_kh = (a.reciprocal() if isinstance(a, torch.Tensor) else 1.0 / a).mean(-1, keepdims=True)  # ≈ 1/(1 + H B H^T / R)
    mc = (eps / c) ** (0.5 * i_kh)
    xN = per_batch(xN, lam)
    return xN * eps / mc, xN * c * mc


def dual_inflation(lam: torch.Tensor, q: torch.Tensor, eps: torch.Tensor, c: torch.Tensor,
                   max_iter: int = 40, tol: float = 1e-12) -> torch.Tensor:
    """Minimiser u = l^2 (B, 1) of the EnKF-N dual cost, by Newton iterations batched over B.

    With t = log u (u = (N-1)/zeta is the squared prior inflation), the dual cost of Bocquet et al. (2015),
    divided by (N-1)/2, is J(t) = sum_i q_i / (lam_i (lam_i u + 1)) + eps/u + c t, where lam_i are the
    eigenvalues of S S^T with eigenvectors v_i and q_i = (v_i^T S d)^2 / (N-1). Only the derivatives are
    needed, and they never divide by lam_i. Where J'' <= 0 (away from the minimum) a unit step downhill is
    taken instead; every step is clipped to |dt| <= 1. Starts at t = 0 (no inflation); each row stops after its
    first step below `tol` (so that a row's result does not depend on the others of its batch), the loop when all
    have.

    On the CPU (no autograd) the iterations run in NumPy on the same float64 numbers: a few (B, N) arrays per
    step, where each torch call costs several times its arithmetic (measured: 0.8 ms of the 2 ms analysis at
    N 40, B 1). Same formulas, same steps, equal to round-off.
    """
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (lam, q, eps, c))
    if lam.device.type == "cpu" and not grad:
        return _dual_inflation_numpy(lam, q, eps, c, max_iter, tol)
    t = torch.zeros_like(eps + c)
    done = torch.zeros_like(t, dtype=torch.bool)
    for _ in range(max_iter):
        u = t.exp()
        a = lam * u + 1
        g = -(q * u / a**2).sum(-1, keepdim=True) - eps / u + c
        h = -(q * u * (1 - lam * u) / a**3).sum(-1, keepdim=True) + eps / u
        step = torch.where(h > 0, g / h.clamp(min=torch.finfo(h.dtype).tiny), g.sign()).clamp(-1.0, 1.0)
        # a blown-up row (flagged by the caller) stops at once; a converged row stops where it would alone
        step = torch.where(torch.isfinite(step) & ~done, step, 0.0)
        t = t - step
        done = done | (step.abs() < tol)
        if bool(done.all()):
            break
    return t.exp()


def _dual_inflation_numpy(lam, q, eps, c, max_iter, tol):
    """`dual_inflation` on CPU tensors, iterated in NumPy (see there)."""
    L, Q = lam.detach().numpy(), q.detach().numpy()
    eps_, c_ = eps.detach().numpy(), c.detach().numpy()
    if eps_.shape != c_.shape:
        eps_, c_ = np.broadcast_arrays(eps_, c_)
    tiny = np.finfo(L.dtype).tiny
    if eps_.size == 1 and L.dtype == np.float64:  # one experiment: its (1, 1) numbers as Python floats
        with np.errstate(all="ignore"):
            t = _newton_one_row(L.reshape(-1), Q.reshape(-1), float(eps_.item()), float(c_.item()), max_iter, tol,
                                float(tiny))
        return torch.from_numpy(np.exp(np.full(eps_.shape, t))).to(lam.dtype)
    t = np.zeros(eps_.shape, dtype=L.dtype)
    done = np.zeros(t.shape, dtype=bool)
    with np.errstate(all="ignore"):  # a blown-up row gives NaN here, as in torch; it is flagged by the caller
        for _ in range(max_iter):
            u = np.exp(t)
            Lu, Qu, eps_u = L * u, Q * u, eps_ / u  # each computed once, the same numbers as in the formulas above
            a = Lu + 1
            g = -(Qu / a**2).sum(-1, keepdims=True) - eps_u + c_
            h = -(Qu * (1 - Lu) / a**3).sum(-1, keepdims=True) + eps_u
            # clipped to [-1, 1] by minimum and maximum: np.clip's Python wrapper cost more than its arithmetic
            step = np.minimum(np.maximum(np.where(h > 0, g / np.maximum(h, tiny), np.sign(g)), -1.0), 1.0)
            step = np.where(np.isfinite(step) & ~done, step, 0.0)
            t = t - step
            done = done | (np.abs(step) < tol)
            if done.all():
                break
    return torch.from_numpy(np.exp(t)).to(lam.dtype)


def _newton_one_row(L, Q, eps, c, max_iter, tol, tiny) -> float:
    """The iterations of `_dual_inflation_numpy` for a single row, t in log u: the (N,) sums in NumPy, the rest in
    Python floats. Both round every +, -, *, / correctly in float64, and exp goes through NumPy's, so the numbers
    are those of the batched loop, bit for bit (tests/test_filter_speed.py); a (1, 1) NumPy call costs ~20 times a
    Python float operation, and this loop made ~25 of them per iteration. A row stops where the batched loop marks
    it done: after a step below `tol`, or where the step is not finite (the step is then 0: t is kept)."""
    t = 0.0
    for _ in range(max_iter):
        u = float(np.exp(t))
        Lu, Qu, eps_u = L * u, Q * u, eps / u
        a = Lu + 1
        g = -float((Qu / a**2).sum(-1)) - eps_u + c
        h = -float((Qu * (1 - Lu) / a**3).sum(-1)) + eps_u
        step = g / max(h, tiny) if h > 0 else float((g > 0) - (g < 0))  # np.sign: 0 for 0 and for NaN
        step = min(max(step, -1.0), 1.0)
        if not math.isfinite(step):
            break
        t = t - step
        if abs(step) < tol:
            break
    return t


class EnKF_N(InflatedEnsembleFilter):
    """Finite-size EnKF (EnKF-N) in its dual form: it estimates the prior inflation itself, so needs none.

    Refs: Bocquet (2011); Bocquet, Raanes & Hannart (2015). Each analysis minimises the scalar dual cost
    over the squared inflation u = l^2 = (N-1)/zeta (see `dual_inflation`), then performs the ETKF
    update of the ensemble whose anomalies are inflated by l. The hyperprior has the mode correction of
    Bocquet et al. (2015) and is scaled by `xN` (DAPPER's meaning, see `hyperprior`).

    Square root: by default (hess=False) the symmetric square root (u S S^T + I)^-1/2 of the ETKF with the
    estimated inflation, as DAPPER's EnKF_N default (Hess=False). hess=True uses instead the inverse square
    root of the full Hessian of the primal cost at the analysis, u S S^T + I - 2 w w^T/((N-1) eps_N + |w|^2)
    (DAPPER's Hess=True), which accounts for the coupling of the inflation with the mean.

    infl: an extra multiplicative inflation of the forecast anomalies (before the analysis, as in the ETKF
    here; DAPPER applies it after); 1 = none.

    On Lorenz 96 standard (Nx 40, F 8, Δt 0.05, H = I, R = I; 4 experiments x 3000 cycles) the aRMSE is
    0.254 (N = 20) and 0.188 (N = 40) with xN = 1, and 0.188 and 0.179 with xN = 2: the reference table's
    EnKF-N numbers (0.191, 0.179) are those of xN = 2, as DAPPER's notes for this setup also say
    (EnKF_N(N=20): 0.24; with xN=2: 0.19).
    """

    method: Literal["enkf_n"] = "enkf_n"
    xN: float = Field(1.0, gt=0, description="confidence in the hyperprior, as if the ensemble size were xN * N")
    hess: bool = Field(False, description="transform by the full primal Hessian instead of the ETKF square root")
    tunable: ClassVar[tuple[str, ...]] = ("infl", "xN")

    def update(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        N = E.shape[-2]
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma
        Sd = S @ (obs.innovation(xb) / obs.sigma).unsqueeze(-1)  # (B, N, 1)
        lam, V, ok = safe_eigh(S @ S.mT)  # a row that cannot be decomposed is flagged (NaN) at the end
        ok, Sd = zero_bad_rows(ok, Sd)
        lam = lam.clamp(min=0)
        eps, c = hyperprior(lam, N, self.xN)
        u = dual_inflation(lam, (V.mT @ Sd).squeeze(-1) ** 2 / (N - 1), eps, c)
        X = u.sqrt().unsqueeze(-1) * X  # the prior anomalies, inflated by the estimated l
        a = lam * u + 1
        w = u.sqrt().unsqueeze(-1) * (apply_sym(V, a.reciprocal()) @ Sd)  # (B, N, 1), coefficients on X
        if self.hess:
            Hw = apply_sym(V, a) - 2 * (w @ w.mT) / ((N - 1) * eps.unsqueeze(-1) + (w * w).sum(-2, keepdim=True))
            T = apply_sym(*sym_eig_fn(Hw, lambda l: l.clamp(min=1e-12).rsqrt()))
        else:
            T = apply_sym(V, a.rsqrt())
        # (Fusing the mean and anomaly updates into one (w^T + sqrt(N-1) T) X product was tried: a few per cent,
        # but the healthy rows of a batch then differ in the last bit when another row is restarted, and
        # tests/test_hardening.py asks them to be exactly equal.)
        xa = xb + (w.mT @ X).squeeze(-2)
        return flag_rows(ok, xa.unsqueeze(-2) + math.sqrt(N - 1) * (T @ X))
