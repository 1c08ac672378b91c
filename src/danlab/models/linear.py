"""A linear autonomous model x_{k+1} = M x_k, used for exact comparisons with the Kalman filter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearModel:
    M: torch.Tensor  # (Nx, Nx)

    @property
    def Nx(self) -> int:
        return self.M.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.M.to(x).mT

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def spinup(self, x: torch.Tensor, time: float = 0.0) -> torch.Tensor:
        return x
