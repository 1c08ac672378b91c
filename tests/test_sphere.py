"""The spherical-harmonic transform (models/sht.py) against closed forms: mpmath's spherical harmonics (an
independent arbitrary-precision implementation), exact quadrature, and identities of the Laplacian."""

import math

import mpmath
import numpy as np
import pytest
import torch

from danlab.models.sht import SHT, gauss_legendre, legendre, legendre_derivative


@pytest.fixture(scope="module")
def t21():
    return SHT(21, 32, 64)


def random_coefficients(sht: SHT, *batch, seed=0, dtype=torch.complex128):
    """Coefficients of a random real field of degree ≤ T (m = 0 real)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(*batch, sht.T + 1, sht.T + 1, generator=g, dtype=dtype) * sht.mask()
    c[..., 0, :] = c[..., 0, :].real
    return c


PAIRS = [(0, 0), (1, 0), (1, 1), (2, 1), (5, 4), (7, 0), (10, 10), (15, 7), (20, 13), (21, 0), (21, 1), (21, 20), (21, 21)]


def test_legendre_matches_mpmath_spherical_harmonics(t21):
    """P̄_l^m(cos θ)/√(2π) = Y_l^m(θ, 0) of mpmath (orthonormal, Condon–Shortley phase) at every Gaussian
    latitude, to 1e-13 (values are O(1))."""
    P = legendre(21, t21.mu.numpy())
    err = 0.0
    for l, m in PAIRS:
        ref = np.array([float(mpmath.re(mpmath.spherharm(l, m, math.acos(u), 0.0))) for u in t21.mu.numpy()])
        err = max(err, np.abs(P[m, l] / math.sqrt(2 * math.pi) - ref).max())
    assert err < 1e-13, err


def test_legendre_derivative_matches_mpmath():
    """H_l^m = (1-μ²) dP̄_l^m/dμ against mpmath's derivative of its Y_l^m, to 1e-11."""
    mu = np.array([-0.93, -0.41, 0.02, 0.57, 0.88])
    H = legendre_derivative(12, mu)
    err = 0.0
    for l, m in [(1, 0), (1, 1), (3, 2), (8, 5), (12, 0), (12, 12)]:
        d = [float(mpmath.diff(lambda x: mpmath.re(mpmath.spherharm(l, m, mpmath.acos(x), 0)), u)) for u in mu]
        err = max(err, np.abs(H[m, l] / math.sqrt(2 * math.pi) - (1 - mu**2) * np.array(d)).max())
    assert err < 1e-11, err


def test_synthesis_is_the_closed_form_field(t21):
    """A single coefficient c at (l, m) synthesises 2 Re(c Y_l^m) √(2π) (m > 0) on the full grid, against mpmath at
    every 7th grid point."""
    lat, lon = t21.lat.numpy(), t21.lon.numpy()
    for l, m, val in [(5, 4, 0.3 - 0.7j), (13, 6, 1.1 + 0.2j), (21, 17, -0.4 + 0.9j)]:
        c = torch.zeros(22, 22, dtype=torch.complex128)
        c[m, l] = val
        f = t21.synthesis(c).numpy()
        ii, jj = np.unravel_index(np.arange(0, f.size, 7), f.shape)
        ref = [2 * math.sqrt(2 * math.pi) * (val * complex(mpmath.spherharm(l, m, math.pi / 2 - lat[i], lon[j]))).real
               for i, j in zip(ii, jj)]
        assert np.abs(f[ii, jj] - np.array(ref)).max() < 1e-12


def test_gauss_legendre_quadrature_is_exact():
    """Σ w = 2, nodes north to south, and ∫ μ^k dμ exact up to degree 2n - 1."""
    mu, w = gauss_legendre(32)
    assert np.all(np.diff(mu) < 0)
    for k in range(0, 64):
        exact = 0.0 if k % 2 else 2.0 / (k + 1)
        assert abs((w * mu**k).sum() - exact) < 1e-13


def test_round_trip_to_round_off(t21):
    """analysis(synthesis(c)) = c for coefficients of degree ≤ T (batched), and synthesis ∘ analysis is a
    projection: idempotent on any grid field, identity on band-limited ones."""
    c = random_coefficients(t21, 3, 2)
    assert (t21.analysis(t21.synthesis(c)) - c).abs().max() < 1e-13
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 32, 64, generator=g, dtype=torch.float64)  # white noise: not band-limited
    p = t21.synthesis(t21.analysis(f))
    assert (p - f).abs().max() > 0.1
    assert (t21.synthesis(t21.analysis(p)) - p).abs().max() < 1e-13


def test_orthonormality_on_the_grid(t21):
    """The quadrature of a product of two harmonics is δ: Parseval, (2π)·Σ|c|² (m, -m) = ∫ f² dA."""
    c = random_coefficients(t21, seed=3)
    f = t21.synthesis(c)
    integral = (2 * math.pi / 64) * (t21.weights[:, None] * f * f).sum()
    w = torch.tensor([1.0] + [2.0] * 21, dtype=torch.float64)[:, None]
    assert abs(float(integral - 2 * math.pi * (w * c.abs() ** 2).sum())) < 1e-11


def test_gradient_and_divergence_give_the_laplacian(t21):
    """For a band-limited χ: u cos φ = ∂χ/∂λ and v cos φ = (1-μ²) ∂χ/∂μ (the gradient), and the divergence of the
    gradient analysed by parts is -l(l+1) χ_l^m exactly (on a grid fine enough to integrate the products)."""
    sht = SHT(21, 48, 64)
    c = random_coefficients(sht, 2, seed=4)
    div = sht.analysis_divergence(sht.synthesis_dlon(c), sht.synthesis_dmu(c))
    lap = sht.laplacian() * c
    assert (div - lap).abs().max() < 1e-12 * lap.abs().max()


def test_derivatives_on_the_grid_match_finite_differences(t21):
    """∂f/∂λ against the derivative of the closed form e^{imλ}; (1-μ²) ∂f/∂μ against centred differences of
    the synthesis on a shifted latitude (through `legendre` at μ ± h)."""
    c = random_coefficients(t21, seed=5)
    f = t21.synthesis(c)
    fl = t21.synthesis_dlon(c)
    # spectral derivative in λ of the Fourier series of each latitude row
    F = torch.fft.rfft(f, dim=-1)
    k = torch.arange(F.shape[-1], dtype=torch.float64)
    assert (torch.fft.irfft(1j * k * F, n=64, dim=-1) - fl).abs().max() < 1e-11
    mu = t21.mu.numpy()
    h = 1e-6
    Pp, Pm = legendre(21, mu + h), legendre(21, mu - h)
    dP = (Pp - Pm) / (2 * h) * (1 - mu**2)
    fm = torch.einsum("ml,mli->im", c, torch.from_numpy(dP).to(c))
    ref = torch.fft.irfft(torch.nn.functional.pad(fm, (0, 33 - 22)) * 64, n=64, dim=-1)
    assert (ref - t21.synthesis_dmu(c)).abs().max() < 1e-6


def test_transforms_are_differentiable_and_batched():
    """gradcheck of analysis and synthesis (linear maps: their adjoints by autograd) at T3; batches of any
    shape give the row-by-row results; float32 agrees with float64 to float32 round-off."""
    sht = SHT(3, 4, 8)
    g = torch.Generator().manual_seed(6)
    f = torch.randn(1, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.view_as_real(sht.analysis(x)), (f,))
    c = random_coefficients(sht, 1, seed=7).requires_grad_(True)
    assert torch.autograd.gradcheck(sht.synthesis, (c,))
    sht = SHT(5, 8, 16)
    fb = torch.randn(3, 4, 8, 16, generator=g, dtype=torch.float64)
    whole = sht.analysis(fb)
    assert torch.allclose(whole[1, 2], sht.analysis(fb[1, 2]), atol=1e-14)
    assert (sht.analysis(fb.float()) - whole).abs().max() < 1e-5


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="truncation T must be >= 1"):
        SHT(0, 4, 4)
    with pytest.raises(ValueError, match="nlat must be >= T \\+ 1 = 22 .*got 21"):
        SHT(21, 21, 64)
    with pytest.raises(ValueError, match="nlon must be >= 2T \\+ 1 = 43 .*got 42"):
        SHT(21, 32, 42)
    SHT(21, 22, 43)  # the smallest exact grid is accepted
    assert SHT.alias_free(21) == (32, 64) and SHT.alias_free(42) == (64, 128)


# --- the network on the sphere (nets/sphere.py) ------------------------------------------------------------------

def test_sphere_padding_continues_the_field_across_the_poles(t21):
    """The padded rows are the field's values at the points beyond the pole and the date line: for the smooth field
    f = x·a (a fixed direction, x the unit vector of the point), the padding equals f at latitude π - φ (north)
    and longitude λ + π, exactly."""
    from danlab.nets.sphere import sphere_pad
    lat, lon = t21.lat, t21.lon
    a = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)

    def f(la, lo):
        return a[0] * torch.cos(la) * torch.cos(lo) + a[1] * torch.cos(la) * torch.sin(lo) + a[2] * torch.sin(la)

    grid = f(lat[:, None], lon[None, :])
    p = 2
    padded = sphere_pad(grid, p)
    dl = lon[1] - lon[0]
    lon_p = torch.cat([lon[-p:] - 2 * math.pi, lon, lon[:p] + 2 * math.pi])
    lat_p = torch.cat([math.pi - lat[:p].flip(0), lat, -math.pi - lat[-p:].flip(0)])  # beyond the poles
    assert padded.shape == (32 + 2 * p, 64 + 2 * p)
    assert torch.allclose(padded, f(lat_p[:, None], lon_p[None, :]), atol=1e-14)
    assert abs(float(dl) - 2 * math.pi / 64) < 1e-15


def test_sphere_net_is_equivariant_under_rotation_about_the_axis():
    """Rolling the input in longitude by any number of grid points rolls the output likewise (the kernel and the
    pole padding do not prefer a meridian); at initialisation the increment is gain × zeta; gradients reach every
    parameter."""
    from danlab.nets import NetConfig, build_net
    torch.manual_seed(0)
    net = build_net(NetConfig(kind="sphere", nlat=16, Nf=6, Nbl=1, Nl=2, kernel=3, shift=0.0, scale=10.0)).double()
    g = torch.Generator().manual_seed(2)
    E = torch.randn(2, 3, 16 * 32, generator=g, dtype=torch.float64)
    z = torch.randn(2, 16 * 32, generator=g, dtype=torch.float64)
    assert torch.allclose(net(E, z), net.gain * z.unsqueeze(1).expand_as(E))
    torch.nn.init.normal_(net.out.weight, std=0.1)

    def roll(t, s):
        return t.unflatten(-1, (16, 32)).roll(s, -1).flatten(-2)

    out = net(E, z)
    for s in (1, 7, 16):
        assert torch.allclose(net(roll(E, s), roll(z, s)), roll(out, s), atol=1e-12)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_sphere_net_config_is_checked_against_the_grid():
    from danlab.nets import NetConfig
    with pytest.raises(ValueError, match="net.nlat: the sphere network needs"):
        NetConfig(kind="sphere").check_size(2048)
    with pytest.raises(ValueError, match="net.nlat: model.Nx = 2000"):
        NetConfig(kind="sphere", nlat=32).check_size(2000)
    NetConfig(kind="sphere", nlat=32).check_size(2048)


@pytest.mark.parametrize("T,nlat", [(42, 64), (170, 256)])
def test_legendre_functions_are_orthonormal_up_to_the_largest_truncation(T, nlat):
    """Σ_i w_i P̄_l^m P̄_l'^m = δ_ll' to 1e-12 at T42 and at T170 (the config's upper bound), where the sectoral
    functions underflow to 0 near the poles (|P̄_170^170| < 1e-308 there) without harming the quadrature."""
    mu, w = gauss_legendre(nlat)
    P = legendre(T, mu)
    for m in (0, 1, T // 2, T):
        G = (P[m, m:] * w) @ P[m, m:].T
        assert np.abs(G - np.eye(T + 1 - m)).max() < 1e-12


def test_single_precision_stays_single_and_float32_latitudes_are_read_exactly(t21):
    """Fields in float32 are transformed with float32 tables (complex64 out, equal to the float64 transform to
    float32 round-off, the divergence analysis included); legendre() evaluates float32 latitudes in float64."""
    g = torch.Generator().manual_seed(3)
    A, B = (torch.randn(2, 32, 64, generator=g, dtype=torch.float64) for _ in range(2))
    B = B * torch.cos(t21.lat).view(32, 1)  # vanishes towards the poles, as the divergence analysis assumes
    for fn, args in ((t21.analysis, (A,)), (t21.analysis_divergence, (A, B))):
        exact = fn(*args)
        single = fn(*(a.float() for a in args))
        assert single.dtype == torch.complex64 and exact.dtype == torch.complex128
        assert torch.allclose(single.to(torch.complex128), exact, atol=1e-4 * float(exact.abs().max()))
    mu32 = gauss_legendre(12)[0].astype(np.float32)
    assert np.array_equal(legendre(10, mu32), legendre(10, mu32.astype(np.float64)))


def test_sphere_net_layers_dtypes_and_bad_shapes():
    """One activation between consecutive convolutions of a block (none after the last: the residual adds it);
    the latitude input is a fixed buffer, not saved with the weights; the network runs in float64 as in float32;
    a wrong zeta or zeta_members is refused with a ValueError naming it."""
    from danlab.nets import NetConfig, build_net
    torch.manual_seed(0)
    net = build_net(NetConfig(kind="sphere", nlat=16, Nf=6, Nbl=2, Nl=3, kernel=3, shift=0.0, scale=10.0))
    for block in net.blocks:
        assert [type(m).__name__ for m in block.f] == ["SphereConv", "GELU", "SphereConv", "GELU", "SphereConv"]
    assert "mu" not in net.state_dict() and all(k.split(".")[-1] in ("weight", "bias", "gain") for k in net.state_dict())
    torch.nn.init.normal_(net.out.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    E = torch.randn(2, 1, 16 * 32, generator=g)
    z = torch.randn(2, 16 * 32, generator=g)
    out32 = net(E, z)
    out64 = net.double()(E.double(), z.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out32, atol=1e-5)
    with pytest.raises(ValueError, match=r"zeta \(B, Nx\); got \(2, 1, 512\) and \(2, 511\)"):
        net(E.double(), z[:, :-1].double())
    with pytest.raises(ValueError, match=r"zeta_members of the shape of E \(2, 1, 512\); got \(2, 2, 512\)"):
        net(E.double(), z.double(), torch.zeros(2, 2, 512, dtype=torch.float64))
