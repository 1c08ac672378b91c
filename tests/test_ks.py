"""Kuramoto–Sivashinsky (ETDRK4): against an independent NumPy implementation of Kassam & Trefethen's scheme, the
coefficients against their closed forms, invariants of the equation, batching, precision, gradients, the
attractor's statistics, and bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from danlab.models.ks import KuramotoSivashinsky, etdrk4_coefficients

f64 = torch.float64
REF = Path(__file__).parent / "data" / "ks_etdrk4_reference.npz"


def attractor_states(B: int = 4, seed: int = 0, model: KuramotoSivashinsky | None = None) -> torch.Tensor:
    model = model or KuramotoSivashinsky()
    g = torch.Generator().manual_seed(seed)
    return model.spinup(model.initial(torch.randn(B, model.Nx, generator=g, dtype=f64)), 100.0)


def test_matches_independent_reference():
    """10 steps from a state on the attractor agree to 1e-8 relative (measured 3e-15) with the reference
    trajectory of tests/data/make_ks_reference.py (NumPy, complex FFT, Kassam & Trefethen's kursiv.m)."""
    ref = np.load(REF)
    model = KuramotoSivashinsky(Nx=int(ref["Nx"]), length=float(ref["length"]), dt=float(ref["dt"]),
                                contour_points=int(ref["contour_points"]))
    x = torch.from_numpy(ref["u0"])
    for k, expected in enumerate(ref["traj"]):
        x = model.step(x)
        err = np.abs(x.numpy() - expected).max() / np.abs(expected).max()
        assert err < 1e-8, f"step {k + 1}: relative error {err:.2e}"
    # a cycle is `substeps` steps
    two = KuramotoSivashinsky(dt=float(ref["dt"]), substeps=5)(torch.from_numpy(ref["u0"]))
    assert np.abs(two.numpy() - ref["traj"][4]).max() < 1e-8 * np.abs(ref["traj"][4]).max()


def test_coefficients_match_closed_forms():
    """Away from z = hL = 0 (|z| >= 1, no cancellation) the contour means equal the closed-form φ-functions."""
    h = 0.5
    L = -np.logspace(np.log10(2 / h), 3, 50)  # z from -2 to -500
    c = etdrk4_coefficients(L, h)
    z = h * L
    assert np.allclose(c["Q"], h * (np.exp(z / 2) - 1) / z, rtol=1e-12, atol=0)
    assert np.allclose(c["f1"], h * (-4 - z + np.exp(z) * (4 - 3 * z + z**2)) / z**3, rtol=1e-11, atol=0)
    assert np.allclose(c["f2"], h * (2 + z + np.exp(z) * (z - 2)) / z**3, rtol=1e-11, atol=0)
    assert np.allclose(c["f3"], h * (-4 - 3 * z - z**2 + np.exp(z) * (4 - z)) / z**3, rtol=1e-11, atol=0)
    # at z = 0 the limits: Q = h/2, f1 = f3 = h/6, f2 = h/6 (the RK4 weights 1/6, 2/6, 1/6 of h)
    c0 = etdrk4_coefficients(np.zeros(1), h)
    assert np.allclose([c0["Q"][0], c0["f1"][0], c0["f2"][0], c0["f3"][0]], [h / 2, h / 6, h / 6, h / 6], rtol=1e-13)


def test_invariants_and_batching():
    """The spatial mean is conserved (the k = 0 mode has no linear term and no flux), the dynamics commute with
    shifts of the grid, any batch shape gives the same numbers as one state at a time, and float32 follows float64."""
    model = KuramotoSivashinsky()
    x = attractor_states(6).view(2, 3, 128) + 0.3  # a nonzero mean
    y = model(x)
    assert torch.allclose(y.mean(-1), x.mean(-1), atol=1e-12)
    assert torch.allclose(model(x.roll(17, -1)), y.roll(17, -1), atol=1e-12)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(model(x[i, j]), y[i, j], rtol=0, atol=1e-13)
    y32 = model(x.float())
    assert y32.dtype == torch.float32
    assert float((y32.double() - y).abs().max()) < 1e-4 * float(y.abs().max())


def test_dynamics_commute_with_the_reflection():
    """M(R u) = R M(u) for (R u)_j = -u_{-j} (x -> -x, u -> -u), the symmetry a network may average over
    (net.reflect, which only models declaring reflection_symmetric take); Lorenz 96 has no such symmetry."""
    from danlab.models.lorenz96 import Lorenz96
    from danlab.nets.cnn import reflect
    model = KuramotoSivashinsky()
    assert model.reflection_symmetric and not getattr(Lorenz96(), "reflection_symmetric", False)
    x = attractor_states(4) + 0.3  # a nonzero mean, which R turns into its opposite
    assert torch.equal(reflect(reflect(x)), x) and torch.equal(reflect(x)[..., 0], -x[..., 0])
    scale = float(x.abs().max())
    y = x
    for _ in range(20):
        y = model(y)
    y_r = reflect(x)
    for _ in range(20):
        y_r = model(y_r)
    assert float((y_r - reflect(y)).abs().max()) < 1e-10 * scale
    l96, v = Lorenz96(), 8 + torch.randn(2, 40, dtype=f64)
    assert float((l96(reflect(v)) - reflect(l96(v))).abs().max()) > 1e-2


def test_tangent_linear_matches_finite_differences():
    """The gradient through torch.fft (used by the Lyapunov exponents, 4D-Var, training) is the model's derivative:
    the Jacobian-vector product from autograd against centred finite differences."""
    model = KuramotoSivashinsky()
    x = attractor_states(1)[0]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(128, generator=g, dtype=f64)
    _, jvp = torch.func.jvp(model, (x,), (v,))
    eps = 1e-6
    fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
    assert float((jvp - fd).abs().max()) < 1e-6 * float(jvp.abs().max())


def test_attractor_statistics():
    """On the attractor (Nx 128, length 32π): spatial std about 1.3, and the mean energy spectrum peaks near the
    most unstable wavenumber k = 1/√2 (measured: at k = 0.75) and decays exponentially beyond (measured: ~5x per
    0.25 in k, 4e-6 of the peak at k = 3, the same with dt = 0.05, see docs/results/ks_model.md)."""
    model = KuramotoSivashinsky()
    x = attractor_states(8)
    spec = torch.zeros(model.Nx // 2 + 1, dtype=f64)
    stds = []
    for _ in range(200):
        x = model(x)
        spec += model.energy_spectrum(x).mean(0) / 200
        stds.append(float(x.std(-1).mean()))
    k = model.wavenumbers
    kpeak = float(k[spec[1:].argmax() + 1])
    assert 0.45 < kpeak < 0.95, kpeak
    assert 1.1 < np.mean(stds) < 1.5
    tail = spec[(k >= 1.5) & (k <= 3.75)].log()
    assert bool((tail.diff() < 0).all())  # monotone decay
    assert 1e-7 < float(spec[(k - 3.0).abs().argmin()]) / float(spec.max()) < 1e-4


def test_unstable_step_is_flagged_not_a_crash():
    """A step far too large still returns (non-finite or huge values), which the twin's stability check turns into
    a one-line ConfigError (see test_config_refuses_bad_ks); dt = 10 on the attractor is not refused by the model."""
    model = KuramotoSivashinsky(dt=10.0, substeps=1)
    y = model(attractor_states(2))
    assert y.shape == (2, 128)


@pytest.mark.parametrize("kwargs, key", [({"Nx": 127}, "Nx"), ({"Nx": 2}, "Nx"), ({"dt": 0.0}, "dt"),
                                         ({"length": -1.0}, "length"), ({"substeps": 0}, "substeps")])
def test_bad_parameters_refused(kwargs, key):
    with pytest.raises(ValueError, match=key):
        KuramotoSivashinsky(**kwargs)


def test_grid_and_wavenumbers():
    model = KuramotoSivashinsky(Nx=8, length=4 * math.pi)
    assert torch.allclose(model.grid, torch.arange(8, dtype=f64) * math.pi / 2)
    assert torch.allclose(model.wavenumbers, torch.arange(5, dtype=f64) * 0.5)
    assert model.Dt == 1.0


# ---------------------------------------------------------------- the config (model.name: ks) and the twin

CONFIGS = Path(__file__).parents[1] / "configs" / "ks"


@pytest.mark.parametrize("override, message", [
    ("model.Nx=127", "model.Nx: must be even (got 127)"),
    ("model.dt=0", "model.dt: Input should be greater than 0"),
    ("model.length=-1", "model.length: Input should be greater than 0"),
    ("filter.radius=0", "filter.radius: Input should be greater than 0"),
])
def test_config_refuses_bad_ks(override, message):
    from danlab.config import ConfigError, load_config
    from danlab.experiments.run_config import RunConfig
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, CONFIGS / "letkf.yaml", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unstable_step_refused_in_one_line():
    from danlab.config import ConfigError, load_config
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import simulate
    cfg = load_config(RunConfig, CONFIGS / "etkf.yaml", ["model.dt=1e10", "cycles=5", "burn_in=1"])
    with pytest.raises(ConfigError, match="the truth blows up") as err:
        simulate(cfg)
    assert "\n" not in str(err.value) and "model.F" not in str(err.value)


@pytest.mark.parametrize("file, bound", [("etkf.yaml", 0.2), ("letkf.yaml", 0.2)])
def test_ks_configs_track_the_truth(file, bound):
    """The shipped configs run and track the truth over a short run (their scores over 10^4 cycles:
    docs/results/ks_baselines.md, 0.11-0.12; climatology scores 1.3)."""
    from danlab.config import load_config
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import simulate, summarize
    cfg = load_config(RunConfig, CONFIGS / file, ["cycles=150", "burn_in=50"])
    s = summarize(cfg, simulate(cfg))
    assert s["n_diverged"] == 0 and s["armse"] < bound


@pytest.mark.slow
def test_lyapunov_spectrum():
    """λ_1 and the number of clearly positive exponents on the standard setup (docs/results/ks_model.md over 2 × 1000
    time units: λ_1 = 0.089, 10 above 0.005; DAPPER's estimate: 0.08, 0.07, 0.06, ...), here over 2 × 400 (measured:
    λ_1 = 0.078, 12 above 0.005). Takes ~2 min."""
    from danlab.diagnostics.lyapunov import lyapunov_spectrum
    model = KuramotoSivashinsky()
    g = torch.Generator().manual_seed(3)
    lam = lyapunov_spectrum(model, attractor_states(2, seed=3), 500, n=16, transient=100, generator=g).lyapunov.values
    assert 0.07 < lam[0] < 0.11
    assert 8 <= int((lam > 0.005).sum()) <= 12
    # the three neutral directions, at the scatter of this short estimate (measured: λ_11..λ_16 = 0.009, 0.006, 0.002,
    # -0.001, -0.006, -0.007)
    assert int((abs(lam) <= 0.01).sum()) >= 3


def test_initial_state_is_a_small_perturbation_of_rest():
    """The state off the attractor is 0.1 × the noise (u = 0 is an unstable rest state; the spin-up grows it)."""
    noise = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(KuramotoSivashinsky(Nx=64, length=16 * math.pi).initial(noise), 0.1 * noise)


def test_energy_spectrum_is_parseval_per_wavenumber():
    """|û_k|² / Nx² per wavenumber k = 0..Nx/2, for each state of a batch: a sine of amplitude a at k has a²/4 there
    and nothing elsewhere; the mean square of u is E_0 + 2 Σ_{0<k<Nx/2} E_k + E_{Nx/2}."""
    model = KuramotoSivashinsky(Nx=64, length=16 * math.pi)
    x = torch.arange(64, dtype=torch.float64) / 64
    spec = model.energy_spectrum(torch.stack([1.5 * torch.sin(2 * math.pi * 5 * x), 0.5 * torch.cos(2 * math.pi * 9 * x)]))
    assert spec.shape == (2, 33)
    assert torch.allclose(spec[0, 5], torch.tensor(1.5**2 / 4, dtype=torch.float64)) and spec[0, 9] < 1e-28
    assert torch.allclose(spec[1, 9], torch.tensor(0.5**2 / 4, dtype=torch.float64)) and spec[1, 5] < 1e-28
    u = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    E = model.energy_spectrum(u)
    assert torch.allclose(E[:, 0] + 2 * E[:, 1:32].sum(-1) + E[:, 32], u.square().mean(-1), rtol=1e-12)
