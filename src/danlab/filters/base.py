"""What every filter shares: the analysis interface, ensemble statistics, hyperparameters per experiment.

A filter is a frozen pydantic model: its fields are its hyperparameters (validated, with ranges), its
`analysis` maps a forecast ensemble E^f (B, N, Nx) and one cycle's observations to E^a. The forecast is
the model applied to every member (`cycle`); only filters that must see the model inside the analysis
(the IEnKF) override `cycle`.

A tunable hyperparameter (listed in `tunable`) may also be a tensor of shape (B,): one value per
experiment, so that a whole tuning grid runs as one batched run.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from danlab.observations import Obs
from danlab.rng import BatchRNG


def per_batch(value, E: torch.Tensor):
    """A hyperparameter as a python float, or a (B,) tensor viewed as (B, 1, ..., 1) to broadcast against E."""
    if isinstance(value, torch.Tensor):
        return value.to(E).view(-1, *([1] * (E.dim() - 1)))
    return value


def mean_and_anomalies(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble mean (B, Nx) and normalised anomalies X = (E - mean)/sqrt(N-1), (B, N, Nx)."""
    N = E.shape[-2]
    xb = E.mean(-2)
    return xb, (E - xb.unsqueeze(-2)) / math.sqrt(max(N - 1, 1))


def spread(E: torch.Tensor) -> torch.Tensor:
    """sqrt of the mean over sites of the ensemble variance, (B,); 0 for a single member."""
    if E.shape[-2] < 2:
        return torch.zeros(E.shape[0], dtype=E.dtype, device=E.device)
    X = E - E.mean(-2, keepdim=True)
    return (X * X).sum(-2).mean(-1).div(E.shape[-2] - 1).sqrt()


def sym_eig_fn(G: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition G = V diag(lam) V^T of a batch of symmetric matrices; returns (V, fn(lam))."""
    lam, V = torch.linalg.eigh(G)
    return V, fn(lam)


def apply_sym(V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """V diag(d) V^T for batches."""
    return (V * d.unsqueeze(-2)) @ V.mT


class Filter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    N: int = Field(20, ge=1, description="ensemble size")
    tunable: ClassVar[tuple[str, ...]] = ()
    min_N: ClassVar[int] = 1

    @model_validator(mode="after")
    def _check_N(self):
        if self.N < self.min_N:
            raise ValueError(f"N must be >= {self.min_N} for {type(self).__name__} (got {self.N})")
        return self

    def prepare(self, model, observer, dtype, device) -> "Filter":
        """Return the filter ready to run with this model (e.g. with a climatological B); default: itself."""
        return self

    def cycle(self, E: torch.Tensor, model, obs: Obs, rng: BatchRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """One DA cycle from the previous analysis E: returns (E^f, E^a)."""
        Ef = model(E)
        return Ef, self.analysis(Ef, obs, rng)

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement an analysis")
