"""Spherical-harmonic transform in torch: Gauss–Legendre quadrature in latitude, FFT in longitude.

A real field f(λ, μ) on the sphere (λ longitude, μ = sin(latitude)) truncated triangularly at degree T is

    f = Σ_{l=0}^{T} Σ_{m=-l}^{l} f_l^m P̄_l^m(μ) e^{imλ},     f_l^{-m} = conj(f_l^m),

with the associated Legendre functions P̄_l^m normalised to ∫_{-1}^{1} (P̄_l^m)^2 dμ = 1 and the Condon–Shortley
phase (-1)^m, so that P̄_l^m(cos θ) e^{imφ} / √(2π) is the orthonormal Y_l^m of scipy and mpmath. Only m ≥ 0 is
stored: coefficients are complex tensors (..., T+1, T+1) indexed [m, l], zero where l < m.

The grid is Gaussian: `nlat` latitudes at the Gauss–Legendre nodes μ_i (north to south, weights w_i) and
`nlon` equally spaced longitudes λ_j = 2π j / nlon. Analysis (grid → spectral) is exact for a field of degree
≤ T when nlat ≥ T + 1 and nlon ≥ 2T + 1; a product of two such fields (the nonlinear term of a model) is
transformed without aliasing when nlat ≥ (3T + 1)/2 and nlon ≥ 3T + 1 (the "3/2 rule"; T21: 32 × 64, T42: 64 × 128).

The Legendre functions come from the standard three-term recurrence in l at fixed m, started from the sectoral
P̄_m^m = -√((2m+1)/(2m)) √(1-μ²) P̄_{m-1}^{m-1} (P̄_0^0 = 1/√2), stable for the truncations used here (T ≤ ~200
before sectoral values underflow near the poles), computed once in float64 and cast to the field's dtype and
device on first use. Every operation is a batched torch op (matmul, rfft), so the transforms are linear,
differentiable and work on any batch shape (..., nlat, nlon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n Gauss–Legendre nodes μ_i, north to south (decreasing), and their weights (Σ w_i = 2), float64."""
    mu, w = np.polynomial.legendre.leggauss(n)
    return mu[::-1].copy(), w[::-1].copy()


def legendre(T: int, mu: np.ndarray) -> np.ndarray:
    """P̄_l^m(μ) for 0 ≤ m ≤ T, 0 ≤ l ≤ T, shape (T+1, T+1, len(μ)) indexed [m, l, i], zero where l < m.

    Normalised to ∫_{-1}^{1} (P̄_l^m)^2 dμ = 1, with the Condon–Shortley phase. Recurrences (float64):
    P̄_m^m = -√((2m+1)/(2m)) √(1-μ²) P̄_{m-1}^{m-1}, then ε_l^m P̄_l^m = μ P̄_{l-1}^m - ε_{l-1}^m P̄_{l-2}^m with
    ε_l^m = √((l² - m²)/(4l² - 1)).
    """
    mu = np.asarray(mu, dtype=np.float64)
    s = np.sqrt(1.0 - mu * mu)
    P = np.zeros((T + 1, T + 1, mu.size))
    pmm = np.full(mu.size, 1.0 / math.sqrt(2.0))
    for m in range(T + 1):
        if m > 0:
            pmm = -math.sqrt((2 * m + 1) / (2 * m)) * s * pmm
        P[m, m] = pmm
        if m + 1 <= T:
            P[m, m + 1] = math.sqrt(2 * m + 3) * mu * pmm
        for l in range(m + 2, T + 1):
            P[m, l] = (mu * P[m, l - 1] - epsilon(l - 1, m) * P[m, l - 2]) / epsilon(l, m)
    return P


def epsilon(l: int, m: int) -> float:
    """ε_l^m = √((l² - m²)/(4l² - 1)): μ P̄_l^m = ε_{l+1}^m P̄_{l+1}^m + ε_l^m P̄_{l-1}^m."""
    return math.sqrt((l * l - m * m) / (4.0 * l * l - 1.0)) if l > 0 else 0.0


def legendre_derivative(T: int, mu: np.ndarray) -> np.ndarray:
    """H_l^m(μ) = (1 - μ²) dP̄_l^m/dμ = -l ε_{l+1}^m P̄_{l+1}^m + (l + 1) ε_l^m P̄_{l-1}^m, shape (T+1, T+1, len(μ))."""
    P = legendre(T + 1, mu)
    H = np.zeros((T + 1, T + 1, np.size(mu)))
    for m in range(T + 1):
        for l in range(m, T + 1):
            H[m, l] = -l * epsilon(l + 1, m) * P[m, l + 1]
            if l > m:
                H[m, l] += (l + 1) * epsilon(l, m) * P[m, l - 1]
    return H


@dataclass(frozen=True)
class SHT:
    """The spherical-harmonic transform at triangular truncation T on an nlat × nlon Gaussian grid.

    analysis: grid (..., nlat, nlon) -> coefficients (..., T+1, T+1) [m, l]; synthesis: the inverse. Also the
    derivatives needed by a vorticity model: ∂f/∂λ and (1 - μ²) ∂f/∂μ synthesised from coefficients, and the
    analysis of a flux divergence (1/(1-μ²)) ∂A/∂λ + ∂B/∂μ by integration by parts (no derivative on the grid).
    The transform itself refuses a grid too coarse to be exact for degree T (nlat ≤ T or nlon ≤ 2T); models ask
    more (see `alias_free`).
    """

    T: int
    nlat: int
    nlon: int
    _tables: dict = field(default=None, init=False, repr=False, compare=False)
    _cache: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.T < 1:
            raise ValueError(f"SHT: truncation T must be >= 1 (got {self.T})")
        if self.nlat < self.T + 1:
            raise ValueError(f"SHT: nlat must be >= T + 1 = {self.T + 1} for an exact transform (got {self.nlat})")
        if self.nlon < 2 * self.T + 1:
            raise ValueError(f"SHT: nlon must be >= 2T + 1 = {2 * self.T + 1} for an exact transform (got {self.nlon})")
        mu, w = gauss_legendre(self.nlat)
        P = legendre(self.T, mu)
        H = legendre_derivative(self.T, mu)
        m = np.arange(self.T + 1, dtype=np.float64)
        tables = {
            "mu": mu, "w": w,
            "P": P,  # synthesis (m, l, i)
            "Pw": P * w,  # analysis (m, l, i)
            "H": H,  # synthesis of (1 - mu^2) d/dmu
            "Pdiv": P * (w / (1 - mu * mu)),  # divergence analysis, λ part (times i m)
            "Hdiv": -H * (w / (1 - mu * mu)),  # divergence analysis, μ part (by parts)
            "m": m,
            "lap": -np.array([[l * (l + 1.0) if l >= mm else 0.0 for l in range(self.T + 1)] for mm in range(self.T + 1)]),
            "mask": np.array([[1.0 if l >= mm else 0.0 for l in range(self.T + 1)] for mm in range(self.T + 1)]),
        }
        object.__setattr__(self, "_tables", {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tables.items()})
        object.__setattr__(self, "_cache", {})

    @staticmethod
    def alias_free(T: int) -> tuple[int, int]:
        """The smallest Gaussian grid (nlat, nlon) on which products of two fields of degree T are not aliased:
        nlat ≥ (3T + 1)/2, nlon ≥ 3T + 1, both rounded up to even numbers (T21: 32 × 64; T42: 64 × 128)."""
        nlon = 3 * T + 1 + (3 * T + 1) % 2
        nlat = math.ceil((3 * T + 1) / 2)
        return nlat + nlat % 2, nlon

    # --- tables cast to the field's dtype and device, once each -----------------------------------------------
    def table(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        key = (name, dtype, str(device))
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(dtype=dtype, device=device)
        return self._cache[key]

    @property
    def mu(self) -> torch.Tensor:
        """sin(latitude) at the Gaussian latitudes, north to south, (nlat,), float64."""
        return self._tables["mu"]

    @property
    def weights(self) -> torch.Tensor:
        """Gauss–Legendre weights (nlat,), float64 (Σ = 2): ∫ f dA ≈ (2π/nlon) Σ_ij w_i f_ij."""
        return self._tables["w"]

    @property
    def lat(self) -> torch.Tensor:
        """Latitudes in radians, north to south, (nlat,), float64."""
        return torch.asin(self.mu)

    @property
    def lon(self) -> torch.Tensor:
        """Longitudes in radians, λ_j = 2π j / nlon, (nlon,), float64."""
        return torch.arange(self.nlon, dtype=torch.float64) * (2 * math.pi / self.nlon)

    def laplacian(self, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
        """-l(l+1) laid out as the coefficients (T+1, T+1) [m, l] (zero where l < m): ∇² on the unit sphere."""
        return self.table("lap", dtype, device)

    def mask(self, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
        """1 where l ≥ m, 0 elsewhere, (T+1, T+1) [m, l]."""
        return self.table("mask", dtype, device)

    # --- the transforms ----------------------------------------------------------------------------------------
    def _check_grid(self, f: torch.Tensor) -> None:
        if f.shape[-2:] != (self.nlat, self.nlon):
            raise ValueError(f"SHT expects grids (..., {self.nlat}, {self.nlon}), got shape {tuple(f.shape)}")

    def _fourier(self, f: torch.Tensor) -> torch.Tensor:
        """The Fourier coefficients F_m(μ_i) = (1/nlon) Σ_j f_ij e^{-imλ_j}, m = 0..T, as real pairs (..., nlat, T+1, 2)."""
        self._check_grid(f)
        F = torch.fft.rfft(f, dim=-1)[..., : self.T + 1] / self.nlon
        return torch.view_as_real(F)

    def _legendre_analysis(self, Fr: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Σ_i table[m, l, i] F_m(μ_i): real pairs (..., nlat, M, 2) -> complex (..., M, L)."""
        out = torch.einsum("...imc,mli->...mlc", Fr, table)
        return torch.view_as_complex(out.contiguous())

    def _legendre_synthesis(self, c: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """F_m(μ_i) = Σ_l c[m, l] table[m, l, i], then the inverse FFT: complex (..., M, L) -> grid (..., nlat, nlon)."""
        cr = torch.view_as_real(c)
        F = torch.view_as_complex(torch.einsum("...mlc,mli->...imc", cr, table).contiguous())
        return torch.fft.irfft(F * self.nlon, n=self.nlon, dim=-1)

    def _real_table(self, name: str, c: torch.Tensor) -> torch.Tensor:
        return self.table(name, c.real.dtype if c.is_complex() else c.dtype, c.device)

    def analysis(self, f: torch.Tensor) -> torch.Tensor:
        """Grid (..., nlat, nlon) -> coefficients f_l^m (..., T+1, T+1) [m, l], complex: the projection of f on the
        harmonics of degree ≤ T (exact for a field of degree ≤ T)."""
        return self._legendre_analysis(self._fourier(f), self.table("Pw", f.dtype, f.device))

    def synthesis(self, c: torch.Tensor) -> torch.Tensor:
        """Coefficients (..., T+1, T+1) [m, l] -> grid (..., nlat, nlon). The imaginary part of the m = 0
        coefficients (zero for a real field) is ignored."""
        return self._legendre_synthesis(c, self._real_table("P", c))

    def synthesis_dlon(self, c: torch.Tensor) -> torch.Tensor:
        """∂f/∂λ on the grid from the coefficients of f."""
        m = self._real_table("m", c)
        return self._legendre_synthesis(c * (1j * m).unsqueeze(-1), self._real_table("P", c))

    def synthesis_dmu(self, c: torch.Tensor) -> torch.Tensor:
        """(1 - μ²) ∂f/∂μ = cos φ ∂f/∂φ on the grid from the coefficients of f."""
        return self._legendre_synthesis(c, self._real_table("H", c))

    def analysis_divergence(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Coefficients of (1/(1-μ²)) ∂A/∂λ + ∂B/∂μ from the grids A, B, where B vanishes at the poles (B = v cos φ
        times a field): Σ_i w_i/(1-μ_i²) [i m A_m(μ_i) P̄_l^m(μ_i) - B_m(μ_i) H_l^m(μ_i)]. With A = U q and B = V q,
        U = u cos φ and V = v cos φ the velocity components times cos φ, this is ∇·(q u) on the unit sphere."""
        a = self._legendre_analysis(self._fourier(A), self.table("Pdiv", A.dtype, A.device))
        b = self._legendre_analysis(self._fourier(B), self.table("Hdiv", B.dtype, B.device))
        m = self.table("m", A.dtype, A.device)
        return a * (1j * m).unsqueeze(-1) + b
