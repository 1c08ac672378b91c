"""Observation operators that select sites of the state, with noise R = sigma^2 I.

One cycle's observations are an `Obs`: a 0/1 mask over the Nx sites and the observed values placed at
their sites (zeros elsewhere). Everything the filters need follows exactly from this state-space form:
H(x) is x on the observed sites, Ny = mask.sum(-1), R^-1 = 1/sigma^2, and H^T R^-1 delta lives in
state space with zeros where unobserved. The number and position of the observed sites may differ
between experiments and cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from danlab.rng import BatchRNG


def _bcast(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (B, Nx) mask so that it broadcasts against x of shape (B, ..., Nx)."""
    return mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[-1])


@dataclass
class Obs:
    y: torch.Tensor  # (B, Nx): observed values at observed sites, 0 elsewhere
    mask: torch.Tensor  # (B, Nx): 1 where observed, 0 elsewhere (same dtype as y)
    sigma: float  # observation error standard deviation, R = sigma^2 I
    # every site of every row observed (mask all ones): H is the identity, and the products by the mask, exact
    # multiplications by 1, are skipped (the same numbers; two of the few dozen small tensor calls of an analysis)
    full: bool = False

    @property
    def Ny(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def Rinv(self) -> float:
        return 1.0 / self.sigma**2

    def H(self, x: torch.Tensor) -> torch.Tensor:
        """H(x) in state-space form: x on the observed sites, 0 elsewhere. x: (B, ..., Nx)."""
        return x if self.full else x * _bcast(self.mask, x)

    def innovation(self, x: torch.Tensor) -> torch.Tensor:
        """delta = y - H(x), zeros where unobserved. x: (B, ..., Nx)."""
        d = _bcast(self.y, x) - x
        return d if self.full else d * _bcast(self.mask, x)

    def HtRinv_innovation(self, x: torch.Tensor) -> torch.Tensor:
        """H^T R^-1 (y - H x) in state space."""
        return self.innovation(x) * self.Rinv

    def select(self, rows) -> "Obs":
        return Obs(self.y[rows], self.mask[rows], self.sigma, self.full)


@dataclass(frozen=True)
class Observer:
    """Draws each cycle's observation operator and noisy observations.

    kind: 'identity' (all sites), 'subset' (the fixed `sites`), or 'random' (a subset drawn afresh at
    every cycle for every experiment: `count` sites, or `fraction` of Nx, or a count in [count_min,
    count_max]: drawn uniformly every cycle (count_by 'cycle'), or fixed for each experiment (count_by
    'experiment': count_min + id mod (count_max - count_min + 1), the id being the experiment's, or its batch
    row in training, so that every level of sparsity is sustained on some trajectories, evenly)).
    """

    Nx: int
    sigma: float = 1.0
    kind: Literal["identity", "subset", "random"] = "identity"
    sites: tuple[int, ...] | None = None
    count: int | None = None
    fraction: float | None = None
    count_min: int | None = None
    count_max: int | None = None
    count_by: Literal["cycle", "experiment"] = "cycle"

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"observations.sigma must be > 0 (got {self.sigma})")
        if self.kind == "subset":
            if not self.sites or any(not 0 <= s < self.Nx for s in self.sites) or len(set(self.sites)) != len(self.sites):
                raise ValueError(f"observations.sites must be distinct indices in [0, {self.Nx - 1}] (got {self.sites})")
        if self.kind == "random":
            lo, hi = self.count_range
            if not 1 <= lo <= hi <= self.Nx:
                raise ValueError(f"observations: random counts must lie in [1, Nx={self.Nx}] (got {lo}..{hi})")

    @property
    def count_range(self) -> tuple[int, int]:
        if self.count is not None:
            return self.count, self.count
        if self.fraction is not None:
            c = int(round(self.fraction * self.Nx))
            return c, c
        if self.count_min is not None and self.count_max is not None:
            return self.count_min, self.count_max
        raise ValueError("observations: kind 'random' needs count, fraction, or count_min and count_max")

    def mask(self, B: int, rng: BatchRNG, dtype, device) -> torch.Tensor:
        if self.kind == "identity":
            return torch.ones(B, self.Nx, dtype=dtype, device=device)
        if self.kind == "subset":
            m = torch.zeros(self.Nx, dtype=dtype, device=device)
            m[list(self.sites)] = 1
            return m.expand(B, self.Nx).clone()
        lo, hi = self.count_range
        u = rng.rand(self.Nx + 1, dtype=torch.float64)  # last column draws the count
        if self.count_by == "experiment":
            ids = torch.arange(B) if rng.ids is None else torch.tensor(rng.ids)
            count = lo + ids % (hi - lo + 1)
        else:
            count = lo + torch.floor(u[:, -1] * (hi - lo + 1)).long().clamp(max=hi - lo)
        rank = u[:, :-1].argsort(-1).argsort(-1)  # a random permutation's ranks per row
        return (rank < count[:, None]).to(dtype=dtype, device=device)

    def observe(self, x: torch.Tensor, rng: BatchRNG) -> Obs:
        """Noisy observations of the true states x (B, Nx)."""
        B = x.shape[0]
        mask = self.mask(B, rng, x.dtype, x.device)
        noise = rng.randn(self.Nx, dtype=x.dtype, device=x.device)
        y = x + self.sigma * noise
        full = self.kind == "identity"
        return Obs(y=y if full else y * mask, mask=mask, sigma=self.sigma, full=full)
