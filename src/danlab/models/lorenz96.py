"""Lorenz 96: dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, periodic in i."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from danlab.models.rk4 import rk4_step


@dataclass(frozen=True)
class Lorenz96:
    """Lorenz 96 integrated by RK4.

    `dt` is the integration step and `substeps` the number of RK4 steps per observation
    interval, so the forecast between two cycles spans Δt = substeps * dt.
    Works on any tensor of shape (..., Nx), any float dtype, and is differentiable.
    """

    Nx: int = 40
    F: float = 8.0
    dt: float = 0.05
    substeps: int = 1

    def __post_init__(self):
        if self.Nx < 4:
            raise ValueError(f"Lorenz96.Nx must be >= 4 (got {self.Nx})")
        if not self.dt > 0:
            raise ValueError(f"Lorenz96.dt must be > 0 (got {self.dt})")
        if self.substeps < 1:
            raise ValueError(f"Lorenz96.substeps must be >= 1 (got {self.substeps})")

    @property
    def Dt(self) -> float:
        """Time between two observations (one cycle)."""
        return self.dt * self.substeps

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.Nx:
            raise ValueError(f"Lorenz96 expects states of size Nx={self.Nx}, got shape {tuple(x.shape)}")
        # periodic padding once, then the neighbours are views: x_{i-2}, x_{i-1}, x_{i+1}
        xp = torch.cat([x[..., -2:], x, x[..., :1]], -1)
        return (xp[..., 3:] - xp[..., :-3]) * xp[..., 1:-2] - x + self.F

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One RK4 step of length dt."""
        return rk4_step(self.tendency, x, self.dt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast over one observation interval Δt."""
        for _ in range(self.substeps):
            x = self.step(x)
        return x

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """A state off the attractor from standard normal noise: the fixed point F, perturbed."""
        return self.F + noise

    def spinup(self, x: torch.Tensor, time: float = 50.0) -> torch.Tensor:
        """Integrate x for `time` model time units (no gradient) to land on the attractor."""
        with torch.no_grad():
            for _ in range(int(round(time / self.dt))):
                x = self.step(x)
        return x
