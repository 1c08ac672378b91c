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


def rows_ok(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) True where every entry of the row of each (B, ...) tensor is finite."""
    ok = None
    for t in tensors:
        f = torch.isfinite(t).flatten(1).all(-1)
        ok = f if ok is None else ok & f
    return ok


def sanitise(ok: torch.Tensor, t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """t with the rows where `ok` is False replaced by `value` (t itself, untouched, when every row is ok)."""
    if bool(ok.all()):
        return t
    return torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, torch.as_tensor(value, dtype=t.dtype, device=t.device))


def flag_rows(ok: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """E with the rows where `ok` is False set to NaN: the DA loop then flags those experiments as diverged."""
    return sanitise(ok, E, float("nan"))


def safe_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eigh of a batch of symmetric matrices that never raises: (lam, V, ok). A row that is not finite, or
    on which LAPACK fails to converge (an ensemble blown up to huge values), is replaced by the identity and
    reported in ok (B,) as False, so that its filter can mark that experiment diverged; the other rows are
    decomposed exactly as they would be on their own (the batched decomposition works matrix by matrix)."""
    ok = rows_ok(G)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    G = torch.where(ok.view(-1, 1, 1), G, eye) if not bool(ok.all()) else G
    try:
        lam, V = torch.linalg.eigh(G)
    except torch.linalg.LinAlgError:  # rare: find the rows that fail, one at a time, and replace them
        bad = torch.zeros_like(ok)
        for b in range(G.shape[0]):
            try:
                torch.linalg.eigh(G[b])
            except torch.linalg.LinAlgError:
                bad[b] = True
        ok = ok & ~bad
        G = torch.where(ok.view(-1, 1, 1), G, eye)
        lam, V = torch.linalg.eigh(G)
    ok = ok & rows_ok(lam, V)
    return lam, V, ok


def sym_eig_fn(G: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition G = V diag(lam) V^T of a batch of symmetric matrices; returns (V, fn(lam)). Rows
    that cannot be decomposed (see `safe_eigh`) come back as NaN, so that they propagate to that experiment's
    analysis only."""
    lam, V, ok = safe_eigh(G)
    return V, flag_rows(ok, fn(lam))


def apply_sym(V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """V diag(d) V^T for batches."""
    return (V * d.unsqueeze(-2)) @ V.mT


class Filter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

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
