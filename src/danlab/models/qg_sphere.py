"""Single-layer (equivalent-barotropic) quasi-geostrophic flow on the sphere, spectral in spherical harmonics.

Equations, on the unit sphere (lengths in Earth radii a = 6371 km, time in days, Ω = 7.292e-5 s⁻¹ = 6.3003 day⁻¹):

    q = ∇²ψ - ψ / L_R² + f (1 + h),        f = 2Ω μ,  μ = sin(latitude),
    ∂q'/∂t = -∇·(q u) + κ (ζ* - ζ̄) - r ζ - ν_l q',      q' = ∇²ψ - ψ / L_R²,  ζ = ∇²ψ,  u = k × ∇ψ,

with the potential-vorticity anomaly q' the prognostic variable, L_R the deformation radius (∞: the barotropic
vorticity equation), h the orography in units of the layer depth (topographic PV f h). The forcing relaxes the
zonal-mean vorticity ζ̄ (the m = 0 harmonics) at the rate κ towards ζ*, the vorticity of two zonal jets
u*(φ) = U₀ [exp(-((φ-φ₀)/w)²) + exp(-((φ+φ₀)/w)²)]; the eddies are free of it. The dissipation is a linear drag r
on the relative vorticity and the scale-selective hyperdiffusion ν_l = ν (l(l+1)/(T(T+1)))^p (rate ν at the
truncation degree T). Without forcing and dissipation (κ = r = ν = 0) the flow conserves the energy
E = ½ ⟨|∇ψ|² + ψ²/L_R²⟩ and the potential enstrophy Z = ½ ⟨q²⟩ (⟨·⟩ the mean over the sphere); the transform
method on an alias-free grid keeps both exactly in the semi-discrete system (RK4 adds a drift O(dt⁴)).

Discretisation: spherical harmonics with triangular truncation T (`sht.SHT`); the advection term in flux form
-∇·(q u), u cos φ and v cos φ from ψ and q synthesised on the alias-free Gaussian grid (3T+1 longitudes and
(3T+1)/2 latitudes at least), products on the grid, the divergence analysed by parts; RK4 in time.

The state: the streamfunction ψ on the Gaussian grid, latitudes north to south, flattened latitude-major
(Nx = nlat × nlon: 2048 at T21), in units of 10⁷ m² s⁻¹ (a jet of 30 m s⁻¹ over 1000 km is ψ ~ 3). A forecast
projects the state on the truncation (analysis), integrates the coefficients, and returns ψ on the grid; so any
grid field is a valid state, and the part of an analysis increment beyond degree T is dropped by the next
forecast. Observations are masks over the grid points (see observations.py). Batched over any leading shape
(..., Nx), float64 or float32, differentiable, on any device.

Default setup (T21): L_R = 2000 km, jets of 80 m s⁻¹ at ±45° (width 8°) relaxed at κ = 1 day⁻¹, drag
r = 1/50 day⁻¹, zonal-wavenumber-2 orography h = 0.2 cos(2λ) sin²(2φ), ν = 1 day⁻¹ at degree 21 with p = 4 (∇⁸),
dt = 1 h, Δt = 6 h between observations. Measured (docs/results/qg_model.md): chaotic, λ₁ = 0.35 day⁻¹ (error
doubling in 2.0 days), energy statistically steady after ~40 days (2165 m² s⁻², the two halves of days 200-400
within 0.4 %), ψ std 9.6 × 10⁷ m² s⁻¹. Weaker forcing (jets of 40-50 m s⁻¹ relaxed at the drag rate, or L_R =
1000 km with r = 1/10 day⁻¹) settled on a steady or travelling wave in a short scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from danlab.models.rk4 import rk4_step
from danlab.models.sht import SHT

EARTH_RADIUS_KM = 6371.0
OMEGA = 7.292e-5 * 86400.0  # Earth's rotation rate, per day
# the state unit: ψ (nondimensional, a² per day) times PSI_UNIT is ψ in 10⁷ m² s⁻¹
PSI_UNIT = (EARTH_RADIUS_KM * 1e3) ** 2 / 86400.0 / 1e7
VELOCITY_UNIT = EARTH_RADIUS_KM * 1e3 / 86400.0  # a per day, in m s⁻¹


@dataclass(frozen=True)
class QGSphere:
    """Equivalent-barotropic QG on the sphere (see the module docstring for the equations and units).

    T: triangular truncation; nlat, nlon: the Gaussian grid (None: the smallest alias-free one, see
    `SHT.alias_free`); dt: RK4 step in days; substeps: RK4 steps per observation interval (Δt = substeps × dt);
    deformation_radius: L_R in km (None: infinite); drag: r in day⁻¹; jet_relaxation: κ in day⁻¹; jet_speed,
    jet_latitude, jet_width: the jets U₀, φ₀, w (m s⁻¹, degrees); orography: h₀ (a fraction of the layer depth) of
    h = h₀ cos(2λ) sin²(2φ);
    hyperdiffusion: ν in day⁻¹ at degree T, of order p = hyperdiffusion_order ((∇²)^p).
    """

    T: int = 21
    nlat: int | None = None
    nlon: int | None = None
    dt: float = 1.0 / 24.0
    substeps: int = 6
    deformation_radius: float | None = 2000.0
    drag: float = 0.02
    jet_relaxation: float = 1.0
    jet_speed: float = 80.0
    jet_latitude: float = 45.0
    jet_width: float = 8.0
    orography: float = 0.2
    hyperdiffusion: float = 1.0
    hyperdiffusion_order: int = 4
    sht: SHT = field(default=None, init=False, repr=False, compare=False)
    _static: dict = field(default=None, init=False, repr=False, compare=False)
    _cache: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.T < 1:
            raise ValueError(f"QGSphere.T must be >= 1 (got {self.T})")
        nlat0, nlon0 = SHT.alias_free(self.T)
        nlat = nlat0 if self.nlat is None else self.nlat
        nlon = nlon0 if self.nlon is None else self.nlon
        if nlat < (3 * self.T + 1) / 2:
            raise ValueError(f"QGSphere.nlat must be >= (3T+1)/2 = {(3 * self.T + 1) / 2:g} at T{self.T} "
                             f"(else the nonlinear term aliases), got {nlat}")
        if nlon < 3 * self.T + 1:
            raise ValueError(f"QGSphere.nlon must be >= 3T+1 = {3 * self.T + 1} at T{self.T} "
                             f"(else the nonlinear term aliases), got {nlon}")
        if not self.dt > 0:
            raise ValueError(f"QGSphere.dt must be > 0 (got {self.dt})")
        if self.substeps < 1:
            raise ValueError(f"QGSphere.substeps must be >= 1 (got {self.substeps})")
        if self.deformation_radius is not None and not self.deformation_radius > 0:
            raise ValueError(f"QGSphere.deformation_radius must be > 0 km, or None for infinite (got {self.deformation_radius})")
        for name in ("drag", "jet_relaxation", "hyperdiffusion"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"QGSphere.{name} must be >= 0 (got {getattr(self, name)})")
        if self.hyperdiffusion_order < 1:
            raise ValueError(f"QGSphere.hyperdiffusion_order must be >= 1 (got {self.hyperdiffusion_order})")
        object.__setattr__(self, "nlat", nlat)
        object.__setattr__(self, "nlon", nlon)
        sht = SHT(self.T, nlat, nlon)
        object.__setattr__(self, "sht", sht)
        object.__setattr__(self, "_static", self._static_fields(sht))
        object.__setattr__(self, "_cache", {})

    # --- fixed fields, float64 -------------------------------------------------------------------------------
    def _static_fields(self, sht: SHT) -> dict:
        T = self.T
        lap = sht.laplacian()  # -l(l+1), (T+1, T+1)
        inv_LR2 = 0.0 if self.deformation_radius is None else (EARTH_RADIUS_KM / self.deformation_radius) ** 2
        mask = sht.mask()
        lam = (-lap + inv_LR2) * mask  # q' = -lam psi
        inv_lam = torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, 1.0), 0.0)  # psi_00 = 0 when L_R = inf
        lat, lon = sht.lat, sht.lon
        mu = sht.mu
        f = 2 * OMEGA * mu[:, None].expand(sht.nlat, sht.nlon)
        h = self.orography * torch.cos(2 * lon)[None, :] * torch.sin(2 * lat)[:, None] ** 2
        q_static = sht.analysis(f * (1 + h))  # planetary and topographic PV, truncated
        phi0, w = math.radians(self.jet_latitude), math.radians(self.jet_width)
        u = (self.jet_speed / VELOCITY_UNIT) * (torch.exp(-((lat - phi0) / w) ** 2) + torch.exp(-((lat + phi0) / w) ** 2))
        U = (u * torch.cos(lat))[:, None].expand(sht.nlat, sht.nlon).contiguous()
        zeta_jet = -sht.analysis_divergence(torch.zeros_like(U), U)  # ζ = -∂(u cos φ)/∂μ
        degree = torch.arange(T + 1, dtype=torch.float64)
        nu = self.hyperdiffusion * (degree * (degree + 1) / (T * (T + 1))) ** self.hyperdiffusion_order
        return {"lap": lap, "lam": lam, "inv_lam": inv_lam, "mask": mask, "q_static": q_static,
                "zeta_jet": zeta_jet, "zonal": (torch.arange(T + 1) == 0).to(torch.float64)[:, None], "nu": nu.expand(T + 1, T + 1).contiguous(),
                "psi_jet": zeta_jet * torch.where(lap < 0, 1.0 / torch.where(lap < 0, lap, 1.0), 0.0),  # ζ = ∇²ψ
                "mweight": torch.tensor([1.0] + [2.0] * T, dtype=torch.float64)[:, None],  # m and -m
                "inv_LR2": torch.tensor(inv_LR2, dtype=torch.float64)}

    def static(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """A fixed field, cast once per dtype and device (complex fields to the matching complex dtype)."""
        key = (name, dtype, str(device))
        if key not in self._cache:
            t = self._static[name]
            cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
            self._cache[key] = t.to(dtype=cdt if t.is_complex() else dtype, device=device)
        return self._cache[key]

    # --- grid state <-> spectral PV ------------------------------------------------------------------------------
    @property
    def Nx(self) -> int:
        return self.nlat * self.nlon

    @property
    def Dt(self) -> float:
        """Time between two observations (one cycle), in days."""
        return self.dt * self.substeps

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(nlat, nlon): the state is this grid flattened latitude-major."""
        return self.nlat, self.nlon

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.Nx:
            raise ValueError(f"QGSphere expects states of size Nx = nlat × nlon = {self.Nx}, got shape {tuple(x.shape)}")

    def to_spectral(self, x: torch.Tensor) -> torch.Tensor:
        """State (..., Nx) (ψ on the grid, 10⁷ m² s⁻¹) -> coefficients of the nondimensional ψ (..., T+1, T+1)."""
        self._check(x)
        return self.sht.analysis(x.unflatten(-1, self.grid_shape) / PSI_UNIT)

    def to_grid(self, psi: torch.Tensor) -> torch.Tensor:
        """Coefficients of ψ (..., T+1, T+1) -> state (..., Nx)."""
        return (self.sht.synthesis(psi) * PSI_UNIT).flatten(-2)

    def pv(self, psi: torch.Tensor) -> torch.Tensor:
        """q' = ∇²ψ - ψ/L_R² from ψ (coefficients)."""
        return -self.static("lam", psi.real.dtype, psi.device) * psi

    def streamfunction(self, q: torch.Tensor) -> torch.Tensor:
        """ψ from q' (coefficients); ψ_0^0 = 0 when L_R is infinite."""
        return -self.static("inv_lam", q.real.dtype, q.device) * q

    def tendency(self, q: torch.Tensor) -> torch.Tensor:
        """∂q'/∂t (coefficients) from q' (coefficients)."""
        rdt, dev = q.real.dtype, q.device
        sht = self.sht
        psi = self.streamfunction(q)
        U = -sht.synthesis_dmu(psi)  # u cos φ
        V = sht.synthesis_dlon(psi)  # v cos φ
        qg = sht.synthesis(q + self.static("q_static", rdt, dev))  # total PV on the grid
        dq = -sht.analysis_divergence(U * qg, V * qg)
        if self.drag or self.jet_relaxation:
            zeta = self.static("lap", rdt, dev) * psi
            dq = dq - self.drag * zeta
            if self.jet_relaxation:  # the zonal mean (m = 0) only
                dq = dq + self.jet_relaxation * (self.static("zeta_jet", rdt, dev) - zeta * self.static("zonal", rdt, dev))
        if self.hyperdiffusion:
            dq = dq - self.static("nu", rdt, dev) * q
        return dq * self.static("mask", rdt, dev)

    def step_spectral(self, q: torch.Tensor) -> torch.Tensor:
        """One RK4 step of length dt on q' (coefficients)."""
        return rk4_step(self.tendency, q, self.dt)

    def integrate_spectral(self, q: torch.Tensor, n: int) -> torch.Tensor:
        for _ in range(n):
            q = self.step_spectral(q)
        return q

    def integrate(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """n RK4 steps from the state x (..., Nx), in spectral space in between."""
        q = self.pv(self.to_spectral(x))
        return self.to_grid(self.streamfunction(self.integrate_spectral(q, n)))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One RK4 step of length dt."""
        return self.integrate(x, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast over one observation interval Δt = substeps × dt."""
        return self.integrate(x, self.substeps)

    # --- initial states ----------------------------------------------------------------------------------------
    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """A state off the attractor from standard normal noise (..., Nx): the forced jets' streamfunction plus
        a large-scale perturbation (the noise projected on degrees 1..10, scaled to 20 % of the jets' ψ range)."""
        self._check(noise)
        rdt, dev = noise.dtype, noise.device
        c = self.sht.analysis(noise.unflatten(-1, self.grid_shape))
        deg = torch.arange(self.T + 1, device=dev)
        c = c * ((deg >= 1) & (deg <= 10)).to(rdt)
        pert = self.sht.synthesis(c).flatten(-2)
        pert = pert / pert.std(-1, keepdim=True).clamp(min=1e-12)
        jet = self.to_grid(self.static("psi_jet", rdt, dev))
        return jet + 0.2 * (jet.max() - jet.min()) * pert

    def spinup(self, x: torch.Tensor, time: float = 50.0) -> torch.Tensor:
        """Integrate x for `time` days (no gradient), at least 100 days: the energy of the default setup started by
        `initial` settles within ~40 days (docs/results/qg_model.png)."""
        with torch.no_grad():
            return self.integrate(x, int(round(max(time, 100.0) / self.dt)))

    # --- diagnostics -------------------------------------------------------------------------------------------
    def _sphere_mean_sq(self, c: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """⟨f g⟩-type means by Parseval: (1/4π) ∫ |f|² dA = (1/2) Σ_l [|f_l^0|² + 2 Σ_{m>0} |f_l^m|²]."""
        a = (c.real ** 2 + c.imag ** 2) * self.static("mweight", c.real.dtype, c.device)
        return 0.5 * (a if weight is None else a * weight).sum((-2, -1))

    def inner(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨f g⟩ = (1/4π) ∫ f g dA of two real fields given by their coefficients (..., T+1, T+1), by Parseval."""
        a = (f.real * g.real + f.imag * g.imag) * self.static("mweight", f.real.dtype, f.device)
        return 0.5 * a.sum((-2, -1))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E = ½ ⟨|∇ψ|² + ψ²/L_R²⟩ of the states x (..., Nx), nondimensional (× VELOCITY_UNIT² for m² s⁻²)."""
        psi = self.to_spectral(x)
        return 0.5 * self._sphere_mean_sq(psi, self.static("lam", x.dtype, x.device))

    def enstrophy(self, x: torch.Tensor) -> torch.Tensor:
        """Z = ½ ⟨q²⟩, q the total potential vorticity (planetary and topographic parts included), per day²."""
        q = self.pv(self.to_spectral(x)) + self.static("q_static", x.dtype, x.device)
        return 0.5 * self._sphere_mean_sq(q)

    def energy_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """E(l), the energy per total degree l = 0..T (Σ_l E(l) = energy), (..., T+1)."""
        psi = self.to_spectral(x)
        a = (psi.real ** 2 + psi.imag ** 2) * self.static("lam", x.dtype, x.device) * self.static("mweight", x.dtype, x.device)
        return 0.25 * a.sum(-2)

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latitude, longitude) of every state variable, in radians, (Nx,) each, float64."""
        lat, lon = self.sht.lat, self.sht.lon
        return lat[:, None].expand(self.grid_shape).flatten(), lon[None, :].expand(self.grid_shape).flatten()

    def distances(self) -> torch.Tensor:
        """Great-circle distances between the state variables (grid points), in km, (Nx, Nx), float64."""
        lat, lon = self.coordinates()
        c = (torch.sin(lat)[:, None] * torch.sin(lat)[None, :]
             + torch.cos(lat)[:, None] * torch.cos(lat)[None, :] * torch.cos(lon[:, None] - lon[None, :]))
        return EARTH_RADIUS_KM * torch.arccos(c.clamp(-1.0, 1.0))
