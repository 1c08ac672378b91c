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

import torch
from pydantic import Field, model_validator

from danlab.filters.base import WindowFilter, apply_sym, flag_rows, mean_and_anomalies, safe_eigh, window_run
from danlab.filters.ensemble import _inflate, hyperprior
from danlab.observations import Obs


def _members(x0: torch.Tensor, X0: torch.Tensor, w: torch.Tensor, T: torch.Tensor | float) -> torch.Tensor:
    """The ensemble x0 + X0^T w + sqrt(N-1) T X0 (x0 the mean as (B, 1, Nx)): mean shifted by w, anomalies
    transformed by T (a number: T times the identity, the same numbers without the matrix product)."""
    N = X0.shape[-2]
    TX0 = _times(X0, T) if isinstance(T, float) else T @ X0
    return (x0 + w.unsqueeze(-2) @ X0) + math.sqrt(N - 1) * TX0


def _times(t: torch.Tensor, s: float) -> torch.Tensor:
    """t * s, skipped when s is 1 (the same numbers: SDA, transform variant, sigma 1)."""
    return t if s == 1.0 else t * s


def _rows(value, r: torch.Tensor):
    """A hyperparameter restricted to the batch rows r (a float stays a float)."""
    return value[r.to(value.device)] if isinstance(value, torch.Tensor) else value


class IEnKS(WindowFilter):
    """Iterative EnKS, Gauss-Newton in ensemble space over a window of `lag` cycles (shift 1, SDA or MDA:
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

    def _zeta(self, lam: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Weight of |w|^2 in the cost (the inverse squared prior inflation), (b, 1)."""
        if self.prior == "infl":
            return torch.ones_like(lam[:, :1])
        N = w.shape[-1]
        eps, c = hyperprior(lam, N, _rows(self.xN, r))
        return c / (eps + (w * w).sum(-1, keepdim=True) / (N - 1))

    def window_prior(self, E: torch.Tensor) -> torch.Tensor:
        return _inflate(E, self.infl)

    def window_analysis(self, E: torch.Tensor, model, obs: tuple[Obs, ...], weights: list[float]):
        B, N, _ = E.shape
        x0, X0 = mean_and_anomalies(E)
        x0 = x0.unsqueeze(-2)
        a = 1.0 if self.variant == "transform" else self.eps
        used = [(l, math.sqrt(b)) for l, b in enumerate(weights) if b > 0]  # the observations assimilated
        w = E.new_zeros(B, N)
        T = torch.eye(N, dtype=E.dtype, device=E.device).expand(B, N, N).clone()
        Tinv = T.clone()
        r = torch.arange(B, device=E.device)  # the rows still iterating
        ok = torch.ones(B, dtype=torch.bool, device=E.device)  # False: a blown-up row, flagged (NaN) at the end
        Ef = None
        for it in range(self.max_iter):
            # while every row iterates (always, for one experiment), the whole tensors stand for their rows r: no
            # gathers and scatters by index, a dozen calls per iteration fewer
            full = r.numel() == B
            rows = (lambda t: t) if full else (lambda t: t[r])
            # the first iteration's transforms are the identity: its products by T and T^-1 are skipped
            Tr = a if it == 0 else _times(rows(T), a)
            run = window_run(model, _members(rows(x0), rows(X0), rows(w), Tr), len(obs))
            if it == 0:
                xf, Xf = mean_and_anomalies(run[-1])
                Ef = xf.unsqueeze(-2) + math.sqrt(N - 1) * Xf / a
            S, d = [], []  # observed anomalies and innovations, normalised and weighted, over the window
            for l, sb in used:
                o = obs[l] if full else obs[l].select(r)
                xl, Xl = mean_and_anomalies(run[l])
                S.append(_times(o.H(Xl), sb / (a * o.sigma)))
                d.append(_times(o.innovation(xl), sb / o.sigma))
            S = S[0] if len(S) == 1 else torch.cat(S, -1)
            S = S if it == 0 else rows(Tinv) @ S  # de-conditioned observed anomalies
            lam, V, ok_r = safe_eigh(S @ S.mT)
            lam = lam.clamp(min=0)
            wr = rows(w)
            zeta = self._zeta(lam, wr, r)
            d = d[0] if len(d) == 1 else torch.cat(d, -1)
            grad = S @ d.unsqueeze(-1) - zeta.unsqueeze(-1) * wr.unsqueeze(-1)
            lz = lam + zeta  # the eigenvalues of the cost's Hessian
            dw = (apply_sym(V, lz.reciprocal()) @ grad).squeeze(-1)  # Gauss-Newton step
            T_r, Tinv_r = apply_sym(V, lz.rsqrt()), apply_sym(V, lz.sqrt())
            if full:
                ok, w, T, Tinv = ok & ok_r, wr + dw, T_r, Tinv_r
            else:
                ok[r], w[r], T[r], Tinv[r] = ok[r] & ok_r, wr + dw, T_r, Tinv_r
            r = r[dw.norm(dim=-1) >= self.tol]  # a non-finite step (a blown-up row) leaves too
            if r.numel() == 0:
                break
        converged = torch.ones(B, dtype=torch.bool, device=E.device)
        converged[r] = False  # still iterating after max_iter
        E0a = flag_rows(ok, _members(x0, X0, w, T))
        return Ef, E0a, window_run(model, E0a, len(obs)), converged


class IEnKF(IEnKS):
    """Iterative EnKF: the IEnKS with a window of one cycle (lag 1), whose prior is the previous analysis."""

    method: Literal["ienkf"] = "ienkf"

    @model_validator(mode="after")
    def _lag_one(self):
        if self.lag != 1:
            raise ValueError(f"the IEnKF is the IEnKS of lag 1 (got lag={self.lag}): use method ienks")
        return self
