"""Iterative ensemble Kalman smoother (IEnKS) over a window of L cycles, and the IEnKF, its L = 1 case.

Refs: Sakov, Oliver & Bertino (2012); Bocquet & Sakov (2012, 2014). The analysis of the window
[t_{k-L}, t_k] is sought in the ensemble space of the prior E at its start t_{k-L} (for the IEnKF, the
previous analysis at t_{k-1}): x_{k-L} = x̄ + X^T w (X the normalised anomalies, prior w ~ N(0, I)), and
the cost

    J(w) = sum_l beta_l/2 |R^-1/2 (y_{k-L+l} - H M_l(x̄ + X^T w))|^2 + 1/2 |w|^2          (prior "infl")

(beta: which observations of the window are assimilated, and how much: see `base.WindowFilter`; the IEnKF
has the single term y_k, beta 1; M_l: the model over l cycles)

is minimised by Gauss-Newton, the sensitivities of H M being read from the ensemble propagated through the
model: members x̄ + X^T w + sqrt(N-1) (T X)_n, whose forecast anomalies are "de-conditioned" by T^-1.
The analysis at t_k is the model run from the updated ensemble at t_{k-L} (not a linearised increment),
which costs one more run through the window; every iteration costs one run through the window.

On a linear model one Gauss-Newton step is exact: the IEnKF then equals the ETKF (with the same inflation)
and stops at its second iteration, whatever max_iter.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from danlab.filters.base import WindowFilter, apply_sym, flag_rows, mean_and_anomalies, safe_eigh, window_run
from danlab.filters.ensemble import _inflate, hyperprior
from danlab.observations import Obs


def _members(x0: np.ndarray, X0: np.ndarray, w: np.ndarray, T: np.ndarray | float) -> np.ndarray:
    """The ensemble x0 + X0^T w + sqrt(N-1) T X0 (x0 the mean as (B, 1, Nx)): mean shifted by w, anomalies
    transformed by T (a number: T times the identity, the same numbers without the matrix product)."""
    N = X0.shape[-2]
    TX0 = _times(X0, T) if isinstance(T, float) else T @ X0
    return (x0 + w[:, None] @ X0) + math.sqrt(N - 1) * TX0


def _times(t: np.ndarray, s: float) -> np.ndarray:
    """t * s, skipped when s is 1 (the same numbers: SDA, transform variant, sigma 1)."""
    return t if s == 1.0 else t * s


def _numpy(t) -> np.ndarray:
    """A tensor's numbers as a NumPy array on the CPU (no copy for a CPU tensor)."""
    return t.detach().cpu().numpy()


class IEnKS(WindowFilter):
    """Iterative EnKS, Gauss-Newton in ensemble space over a window of `lag` cycles (shift `shift`, SDA or MDA:
    see `base.WindowFilter`), batched over B.

    prior: "infl" uses the Gaussian prior N(0, I) on w, with the multiplicative inflation `infl` of the
    prior anomalies at the window start (for the IEnKF the previous analysis; on a linear model this is the
    ETKF's inflation of the forecast anomalies); "N" uses the finite-size (EnKF-N) prior, as DAPPER's iEnKS
    with xN: the weight of |w|^2 becomes zeta = c_N / (eps_N + |w|^2/(N-1)) (the primal EnKF-N, re-evaluated
    at every iteration from the current w), with the hyperprior of `ensemble.hyperprior` scaled by `xN`
    (`infl`, if not 1, is applied too).

    Iterations stop, row by row, when the norm of the increment dw (w in units of the prior standard
    deviation) falls below `tol`, or after `max_iter` iterations. The loop runs over iterations only: the
    rows that have converged are frozen and leave the batch.

    variant: "transform" propagates the ensemble transformed by T (Sakov et al. 2012); "bundle" propagates
    a bundle shrunk by `eps` around the current mean, i.e. finite differences (Bocquet & Sakov 2012).

    The returned forecast E^f is that of the first iteration (the inflated prior run through the window).
    On a linear model the SDA IEnKS of any lag (no inflation needed: the prior is the previous analysis run
    forward) gives the ETKF's filtering analyses.
    """

    method: Literal["ienks"] = "ienks"
    infl: float = Field(1.0, gt=0, description="multiplicative inflation of the prior anomalies at the window start")
    prior: Literal["infl", "N"] = Field("infl", description='"infl": Gaussian prior on w; "N": finite-size prior')
    xN: float = Field(1.0, gt=0, description='hyperprior confidence of the "N" prior (as in EnKF_N)')
    max_iter: int = Field(10, ge=1, description="maximum number of Gauss-Newton iterations")
    tol: float = Field(1e-4, ge=0, description="stop when |dw| < tol (w in units of its prior std)")
    variant: Literal["transform", "bundle"] = "transform"
    eps: float = Field(1e-4, gt=0, description="bundle scaling (variant 'bundle' only)")
    tunable: ClassVar[tuple[str, ...]] = ("infl", "xN")
    min_N: ClassVar[int] = 2

    def _zeta(self, lam: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Weight of |w|^2 in the cost (the inverse squared prior inflation), (b, 1)."""
        if self.prior == "infl":
            return np.ones_like(lam[:, :1])
        N = w.shape[-1]
        xN = self.xN if isinstance(self.xN, float) else _numpy(self.xN).astype(lam.dtype)[r, None]
        eps, c = hyperprior(lam, N, xN)
        return c / (eps + (w * w).sum(-1, keepdims=True) / (N - 1))

    def window_prior(self, E: torch.Tensor) -> torch.Tensor:
        return _inflate(E, self.infl)

    def window_analysis(self, E: torch.Tensor, model, obs: tuple[Obs, ...], weights: list[float]):
        # The Gauss-Newton algebra, on (B, N, Nx) ensembles and (B, N, N) matrices, runs in NumPy on the CPU (only
        # the model runs on its device, as tensors): it is a few dozen small operations per iteration, where a torch
        # call costs several times its arithmetic (the IEnKF's time per cycle fell by 40 %, measured on a 2-core
        # AVX-512 Xeon: see docs/results/filter_speed.md).
        B, N, _ = E.shape
        tensor = lambda a: torch.from_numpy(a).to(E.device)  # noqa: E731
        x0, X0 = mean_and_anomalies(_numpy(E))
        x0 = x0[:, None]
        a = 1.0 if self.variant == "transform" else self.eps
        # the observations assimilated, their weights and their numbers as arrays
        used = [(l, math.sqrt(b), _numpy(obs[l].y), None if obs[l].full else _numpy(obs[l].mask), obs[l].sigma)
                for l, b in enumerate(weights) if b > 0]
        w = np.zeros((B, N), dtype=x0.dtype)
        T = np.broadcast_to(np.eye(N, dtype=x0.dtype), (B, N, N)).copy()
        Tinv = T.copy()
        r = np.arange(B)  # the rows still iterating
        ok = np.ones(B, dtype=bool)  # False: a blown-up row, flagged (NaN) at the end
        Ef = None
        with np.errstate(all="ignore"):  # a blown-up row gives inf or NaN, as in torch; it is flagged below
            for it in range(self.max_iter):
                # while every row iterates (always, for one experiment), the whole arrays stand for their rows r
                full = len(r) == B
                rows = (lambda t: t) if full else (lambda t: t[r])
                # the first iteration's transforms are the identity: its products by T and T^-1 are skipped
                Tr = a if it == 0 else _times(rows(T), a)
                run = window_run(model, tensor(_members(rows(x0), rows(X0), rows(w), Tr)), len(obs))
                if it == 0:
                    xf, Xf = mean_and_anomalies(_numpy(run[-1]))
                    Ef = xf[:, None] + math.sqrt(N - 1) * Xf / a
                S, d = [], []  # observed anomalies and innovations, normalised and weighted, over the window
                for l, sb, y, mask, sigma in used:
                    xl, Xl = mean_and_anomalies(_numpy(run[l]))
                    m = None if mask is None else rows(mask)
                    S.append(_times(Xl if m is None else Xl * m[:, None], sb / (a * sigma)))
                    d.append(_times(rows(y) - xl if m is None else (rows(y) - xl) * m, sb / sigma))
                S = S[0] if len(S) == 1 else np.concatenate(S, -1)
                S = S if it == 0 else rows(Tinv) @ S  # de-conditioned observed anomalies
                lam, V, ok_r = safe_eigh(S @ S.mT)
                lam = np.maximum(lam, 0)
                wr = rows(w)
                zeta = self._zeta(lam, wr, r)
                d = d[0] if len(d) == 1 else np.concatenate(d, -1)
                grad = (S @ d[..., None])[..., 0] - zeta * wr
                lz = lam + zeta  # the eigenvalues of the cost's Hessian
                dw = (apply_sym(V, 1 / lz) @ grad[..., None])[..., 0]  # Gauss-Newton step
                sq = np.sqrt(lz)
                T_r, Tinv_r = apply_sym(V, 1 / sq), apply_sym(V, sq)
                if full:
                    ok, w, T, Tinv = ok & ok_r, wr + dw, T_r, Tinv_r
                else:
                    ok[r], w[r], T[r], Tinv[r] = ok[r] & ok_r, wr + dw, T_r, Tinv_r
                r = r[np.sqrt((dw * dw).sum(-1)) >= self.tol]  # a non-finite step (a blown-up row) leaves too
                if len(r) == 0:
                    break
            E0a = _members(x0, X0, w, T)
        converged = np.ones(B, dtype=bool)
        converged[r] = False  # still iterating after max_iter
        E0a = flag_rows(tensor(ok), tensor(E0a))
        return tensor(Ef), E0a, window_run(model, E0a, len(obs)), tensor(converged)


class IEnKF(IEnKS):
    """Iterative EnKF: the IEnKS with a window of one cycle (lag 1), whose prior is the previous analysis."""

    method: Literal["ienkf"] = "ienkf"

    @model_validator(mode="after")
    def _lag_one(self):
        if self.lag != 1:
            raise ValueError(f"the IEnKF is the IEnKS of lag 1 (got lag={self.lag}): use method ienks")
        return self
