"""Ensemble Kalman filters: stochastic EnKF, ETKF (symmetric square root), EnKF-N (finite-size).

Notation: E (B, N, Nx) ensemble, x̄ its mean, X = (E - x̄)/sqrt(N-1) the normalised anomalies,
S = H X R^-1/2 the observed anomalies, d = R^-1/2 (y - H x̄) the normalised innovation. Observations are
in state-space form (see observations.py), so every product below over the observation space is an
exact product over the observed sites.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from danlab.filters.base import Filter, apply_sym, mean_and_anomalies, per_batch, sym_eig_fn
from danlab.observations import Obs
from danlab.rng import BatchRNG


def _inflate(E: torch.Tensor, infl) -> torch.Tensor:
    """Multiply the anomalies by infl (a float or a (B,) tensor)."""
    if not isinstance(infl, torch.Tensor) and infl == 1.0:
        return E
    xb = E.mean(-2, keepdim=True)
    return xb + per_batch(infl, E) * (E - xb)


class EnKF(Filter):
    """Stochastic EnKF with perturbed observations (perturbations centred over the members)."""

    method: Literal["enkf"] = "enkf"
    infl: float = Field(1.0, gt=0, description="multiplicative inflation of the forecast anomalies")
    tunable: ClassVar[tuple[str, ...]] = ("infl",)
    min_N: ClassVar[int] = 2

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        E = _inflate(E, self.infl)
        B, N, Nx = E.shape
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma
        eps = rng.randn(N, Nx, dtype=E.dtype, device=E.device)
        eps = (eps - eps.mean(-2, keepdim=True)) * math.sqrt(N / (N - 1))
        D = (obs.innovation(E) + obs.H(obs.sigma * eps)) / obs.sigma  # R^-1/2 (y + e_n - H E_n)
        C = torch.linalg.inv(S @ S.mT + torch.eye(N, dtype=E.dtype, device=E.device))
        # K D_n = X^T (S S^T + I)^-1 S D_n for each member n
        return E + (D @ S.mT @ C) @ X


class ETKF(Filter):
    """Ensemble transform Kalman filter, symmetric square root, multiplicative inflation."""

    method: Literal["etkf"] = "etkf"
    infl: float = Field(1.0, gt=0, description="multiplicative inflation of the forecast anomalies")
    tunable: ClassVar[tuple[str, ...]] = ("infl",)
    min_N: ClassVar[int] = 2

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        E = _inflate(E, self.infl)
        N = E.shape[-2]
        xb, X = mean_and_anomalies(E)
        S = obs.H(X) / obs.sigma
        d = obs.innovation(xb) / obs.sigma
        V, lam = sym_eig_fn(S @ S.mT, lambda l: l.clamp(min=0) + 1.0)
        w = apply_sym(V, 1.0 / lam) @ (S @ d.unsqueeze(-1))  # (B, N, 1)
        T = apply_sym(V, lam.rsqrt())
        xa = xb + (w.mT @ X).squeeze(-2)
        return xa.unsqueeze(-2) + math.sqrt(N - 1) * (T @ X)
