"""Kuramoto–Sivashinsky: u_t = -u u_x - u_xx - u_xxxx on a periodic domain [0, length), pseudo-spectral, ETDRK4."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch


def etdrk4_coefficients(L: np.ndarray, h: float, contour_points: int = 32) -> dict[str, np.ndarray]:
    """The ETDRK4 coefficients of Cox & Matthews (2002) for the diagonal linear operator L (real, float64) and the
    step h, by the contour integral of Kassam & Trefethen (2005): each φ-function of z = hL is the mean of its
    values on `contour_points` points of the unit circle around z (in the upper half-plane, the lower half
    being the conjugate), which avoids the cancellation of the closed forms near z = 0.

    Returns E = e^{hL}, E2 = e^{hL/2}, Q = h φ(z/2) with φ(z) = (e^z - 1)/z, and the three weights f1, f2, f3 of
    the final combination, each real and of L's shape."""
    r = np.exp(1j * np.pi * (np.arange(1, contour_points + 1) - 0.5) / contour_points)
    z = h * L[:, None] + r[None, :]
    mean = lambda a: h * a.mean(-1).real  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):  # a step far too large: inf/nan, flagged by the twin's check
        ez = np.exp(z)
        return {
            "E": np.exp(h * L), "E2": np.exp(h * L / 2),
            "Q": mean((np.exp(z / 2) - 1) / z),
            "f1": mean((-4 - z + ez * (4 - 3 * z + z**2)) / z**3),
            "f2": mean((2 + z + ez * (z - 2)) / z**3),
            "f3": mean((-4 - 3 * z - z**2 + ez * (4 - z)) / z**3),
        }


@dataclass(frozen=True)
class KuramotoSivashinsky:
    """Kuramoto–Sivashinsky u_t = -u u_x - u_xx - u_xxxx, periodic on [0, length), on Nx equally spaced points
    x_j = j length/Nx, integrated in Fourier space by ETDRK4 (Cox & Matthews 2002) with the contour-integral
    coefficients of Kassam & Trefethen (2005), computed once in float64.

    In Fourier space, with wavenumbers k_n = 2π n/length (n = 0 .. Nx/2), v_t = L v + N(v), with the stiff linear
    part L = k^2 - k^4 solved exactly and the nonlinearity N(v) = -(i k/2) F[(F^-1 v)^2] by the RK4-like stages.
    No dealiasing (as Kassam & Trefethen). The Nyquist mode n = Nx/2 has no derivative (ik = 0 there, as for any
    real odd derivative) and decays at its own rate k^2 - k^4 (Kassam & Trefethen set k = 0 there, which freezes
    it: on the attractor its amplitude is at round-off, so both agree; here noise put into it dies out).

    Standard setup (Kassam & Trefethen; Bocquet et al. 2019 in DAPPER): Nx = 128, length = 32π, dt = 0.5,
    observed every 2 steps (Δt = 1). `dt` is the integration step and `substeps` the steps per observation
    interval, so one cycle spans Δt = substeps × dt. Any batch shape (..., Nx), float64 or float32 (the
    coefficients are cast to the state's dtype), differentiable (torch.fft), on any device.

    On this setup (measured, docs/results/ks_model.md): λ_1 = 0.089 per time unit (DAPPER: 0.08), 10 exponents above
    0.005 and 5 within ±0.005 (three neutral: translations in time and space, the conserved mean); spatial std 1.32;
    a mean energy spectrum peaked near k = 1/√2 (the most unstable wavenumber of L) with an exponential tail.
    """

    # the dynamics commute with the reflection (R u)_j = -u_{-j} (x -> -x, u -> -u): M(R u) = R M(u), to round-off
    # (in Fourier space R v_n = -conj(v_n), and L is real, g real); a network may average over it (net.reflect)
    reflection_symmetric: ClassVar[bool] = True

    Nx: int = 128
    length: float = 32 * math.pi
    dt: float = 0.5
    substeps: int = 2
    contour_points: int = 32
    _coef: dict = field(default=None, init=False, repr=False, compare=False)
    _cache: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.Nx < 4 or self.Nx % 2:
            raise ValueError(f"KuramotoSivashinsky.Nx must be even and >= 4 (got {self.Nx})")
        if not self.dt > 0:
            raise ValueError(f"KuramotoSivashinsky.dt must be > 0 (got {self.dt})")
        if not self.length > 0:
            raise ValueError(f"KuramotoSivashinsky.length must be > 0 (got {self.length})")
        if self.substeps < 1:
            raise ValueError(f"KuramotoSivashinsky.substeps must be >= 1 (got {self.substeps})")
        k = 2 * np.pi / self.length * np.arange(self.Nx // 2 + 1)
        coef = etdrk4_coefficients(k**2 - k**4, self.dt, self.contour_points)
        kd = k.copy()
        kd[-1] = 0.0  # the Nyquist mode: no odd derivative
        coef["g"] = -0.5 * kd  # N(v) = i g F[u^2]
        object.__setattr__(self, "_coef", {n: torch.from_numpy(c) for n, c in coef.items()})
        object.__setattr__(self, "_cache", {})

    @property
    def Dt(self) -> float:
        """Time between two observations (one cycle)."""
        return self.dt * self.substeps

    @property
    def grid(self) -> torch.Tensor:
        """The sites x_j = j length / Nx, (Nx,), float64."""
        return torch.arange(self.Nx, dtype=torch.float64) * (self.length / self.Nx)

    @property
    def wavenumbers(self) -> torch.Tensor:
        """k_n = 2π n / length for the rfft modes n = 0 .. Nx/2, float64."""
        return torch.arange(self.Nx // 2 + 1, dtype=torch.float64) * (2 * math.pi / self.length)

    def coefficients(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The ETDRK4 coefficients in the state's real dtype on its device (cast once per dtype and device)."""
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = {n: c.to(dtype=dtype, device=device) for n, c in self._coef.items()}
        return self._cache[key]

    def _nonlinear(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        u = torch.fft.irfft(v, n=self.Nx, dim=-1)
        return 1j * g * torch.fft.rfft(u * u, dim=-1)

    def _step_spectral(self, v: torch.Tensor, c: dict) -> torch.Tensor:
        E, E2, Q, g = c["E"], c["E2"], c["Q"], c["g"]
        Nv = self._nonlinear(v, g)
        a = E2 * v + Q * Nv
        Na = self._nonlinear(a, g)
        b = E2 * v + Q * Na
        Nb = self._nonlinear(b, g)
        cc = E2 * a + Q * (2 * Nb - Nv)
        Nc = self._nonlinear(cc, g)
        return E * v + c["f1"] * Nv + 2 * c["f2"] * (Na + Nb) + c["f3"] * Nc

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.Nx:
            raise ValueError(f"KuramotoSivashinsky expects states of size Nx={self.Nx}, got shape {tuple(x.shape)}")

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One ETDRK4 step of length dt."""
        return self.integrate(x, 1)

    def integrate(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """n ETDRK4 steps, staying in Fourier space in between."""
        self._check(x)
        c = self.coefficients(x.dtype, x.device)
        v = torch.fft.rfft(x, dim=-1)
        for _ in range(n):
            v = self._step_spectral(v, c)
        return torch.fft.irfft(v, n=self.Nx, dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast over one observation interval Δt = substeps × dt."""
        return self.integrate(x, self.substeps)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """A state off the attractor from standard normal noise: small random perturbations of u = 0 (unstable).
        Noise of amplitude 0.1 grows onto the attractor (spatial std ≈ 1.3) within about 25 time units."""
        return 0.1 * noise

    def spinup(self, x: torch.Tensor, time: float = 50.0) -> torch.Tensor:
        """Integrate x for `time` model time units (no gradient) to land on the attractor."""
        with torch.no_grad():
            return self.integrate(x, int(round(time / self.dt)))

    def energy_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """|û_n|^2 / Nx^2 for n = 0 .. Nx/2 (the squared amplitude of each Fourier mode), (..., Nx/2 + 1)."""
        return torch.fft.rfft(x, dim=-1).abs().square() / self.Nx**2
