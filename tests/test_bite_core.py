"""Tests that bite (issue 14): the models, observation operators, metrics and networks checked against
independent formulas written out here (explicit loops, dense matrices, torch.nn.functional), value by value,
so that a changed operator, constant, index or argument in src/ fails. Each test is well under a second; they
are the fast half of the selection that `make mutation` runs (docs/results/mutation.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from danlab.metrics import combine_ci, integrated_autocorr_time, mean_with_ci, rmse
from danlab.models import LinearModel, Lorenz96
from danlab.nets import AnalysisNet, NetConfig, build_net
from danlab.observations import Obs, Observer, _bcast
from danlab.rng import BatchRNG

f64 = torch.float64
# the RK4 substeps per cycle: `substeps` (issue 14 renames `steps`, which also named the optimiser's steps)
SUBSTEPS = "substeps" if "substeps" in Lorenz96.__dataclass_fields__ else "steps"


def l96(**kw) -> Lorenz96:
    if "substeps" in kw:
        kw[SUBSTEPS] = kw.pop("substeps")
    return Lorenz96(**kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Lorenz 96

def _rk4_reference(x: torch.Tensor, F: float, dt: float, n: int) -> torch.Tensor:
    """n RK4 steps of the L96 tendency written site by site (modular indices, no padding)."""
    Nx = x.shape[-1]

    def f(y):
        out = torch.empty_like(y)
        for i in range(Nx):
            out[..., i] = (y[..., (i + 1) % Nx] - y[..., (i - 2) % Nx]) * y[..., (i - 1) % Nx] - y[..., i] + F
        return out

    for _ in range(n):
        k1 = f(x)
        k2 = f(x + dt / 2 * k1)
        k3 = f(x + dt / 2 * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_l96_forecast_batched_against_the_loop_reference():
    """A (B, N, Nx) ensemble, several substeps: the forecast equals RK4 of the explicit tendency."""
    m = l96(Nx=7, F=5.0, dt=0.02, substeps=3)
    x = 2.0 * torch.randn(2, 3, 7, generator=gen(1), dtype=f64)
    torch.testing.assert_close(m(x), _rk4_reference(x, 5.0, 0.02, 3), rtol=0, atol=1e-12)
    assert math.isclose(m.Dt, 0.06) and l96(dt=0.05, substeps=4).Dt == 0.2


def test_l96_parameters_boundaries():
    l96(Nx=4)  # the smallest size with distinct neighbours i-2, i-1, i, i+1
    with pytest.raises(ValueError, match=r"Nx must be >= 4 \(got 3\)"):
        l96(Nx=3)
    for bad in (0.0, -0.01):
        with pytest.raises(ValueError, match="dt must be > 0"):
            l96(dt=bad)
    l96(dt=1e-9, substeps=1)
    with pytest.raises(ValueError, match=f"{SUBSTEPS} must be >= 1"):
        l96(substeps=0)
    with pytest.raises(ValueError, match=r"Nx=6, got shape \(2, 5\)"):
        l96(Nx=6).tendency(torch.zeros(2, 5))


def test_l96_initial_and_spinup():
    m = l96(Nx=6, F=3.0, dt=0.01)
    noise = torch.randn(2, 6, generator=gen(2), dtype=f64)
    torch.testing.assert_close(m.initial(noise), 3.0 + noise, rtol=0, atol=0)
    # spin-up over `time` model time units: round(time / dt) RK4 steps, without gradient
    x = m.initial(noise).requires_grad_(True)
    s = m.spinup(x, time=0.034)
    assert not s.requires_grad
    torch.testing.assert_close(s, _rk4_reference(x.detach(), 3.0, 0.01, 3), rtol=0, atol=1e-12)
    m = l96(Nx=6, F=3.0, dt=0.25)
    y = x.detach()
    for _ in range(200):  # the default: 50 time units
        y = m.step(y)
    torch.testing.assert_close(m.spinup(x.detach()), y, rtol=0, atol=0)


def test_linear_model():
    M = torch.randn(4, 4, generator=gen(3), dtype=f64)
    m = LinearModel(M)
    x = torch.randn(2, 3, 4, generator=gen(4), dtype=torch.float32)
    assert m.Nx == 4
    y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.einsum("ij,bnj->bni", M.float(), x))
    noise = torch.randn(2, 4, dtype=f64)
    assert m.initial(noise) is noise and m.spinup(noise, 10.0) is noise


# ---------------------------------------------------------------- metrics

def test_rmse_is_the_spatial_root_mean_square():
    x, t = torch.randn(2, 3, 5, generator=gen(5), dtype=f64), torch.randn(2, 3, 5, generator=gen(6), dtype=f64)
    ref = torch.tensor([[math.sqrt(sum(float(x[a, b, i] - t[a, b, i]) ** 2 for i in range(5)) / 5) for b in range(3)]
                        for a in range(2)], dtype=f64)
    torch.testing.assert_close(rmse(x, t), ref, rtol=0, atol=1e-14)


def _tau_reference(x: np.ndarray, c: float) -> float:
    """Sokal's integrated autocorrelation time with the autocorrelation summed directly (no FFT)."""
    n = len(x)
    x = x - x.mean()
    var = float(np.sum(x * x)) / n
    tau = 1.0
    for W in range(1, n):
        tau += 2.0 * float(np.sum(x[: n - W] * x[W:])) / (n * var)
        if W >= c * tau:
            break
    return max(tau, 1.0)


def _ar1(n: int, phi: float, seed: int) -> np.ndarray:
    rs = np.random.default_rng(seed)
    e, x = rs.standard_normal(n), np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x + 3.0


@pytest.mark.parametrize("phi, c", [(0.9, 5.0), (0.6, 5.0), (0.9, 2.0), (0.0, 5.0), (-0.7, 5.0)])
def test_integrated_autocorrelation_time_against_the_direct_sum(phi, c):
    x = _ar1(400, phi, seed=1)
    tau = integrated_autocorr_time(x, c=c)
    assert tau == pytest.approx(_tau_reference(x, c), rel=1e-10, abs=1e-12)
    if phi == 0.9 and c == 5.0:
        assert 10 < tau < 25  # (1 + phi)/(1 - phi) = 19 for an AR(1)
    if phi < 0:
        assert tau == 1.0  # anti-correlated: tau < 1 is clipped to 1


def test_integrated_autocorrelation_time_edge_cases():
    assert integrated_autocorr_time(np.array([1.0, 2.0, 3.0])) == 1.0  # too short to estimate
    assert math.isnan(integrated_autocorr_time(np.array([1.0, 2.0, np.nan, 4.0])))
    assert math.isnan(integrated_autocorr_time(np.array([1.0, 2.0, np.inf, 4.0, 5.0])))
    assert integrated_autocorr_time(np.full(10, 2.5)) == 1.0  # no variance
    x32 = _ar1(200, 0.7, seed=3).astype(np.float32)  # computed in float64 whatever the input's precision
    assert integrated_autocorr_time(x32) == pytest.approx(_tau_reference(x32.astype(np.float64), 5.0), rel=1e-12)
    assert integrated_autocorr_time([1.0, 2.0, 0.5, 3.0]) == pytest.approx(_tau_reference(np.array([1.0, 2.0, 0.5, 3.0]), 5.0))


def test_mean_with_ci():
    x = _ar1(300, 0.8, seed=2)
    m, hw = mean_with_ci(x)
    assert m == pytest.approx(x.mean(), rel=1e-14)
    assert hw == pytest.approx(1.96 * math.sqrt(x.var(ddof=1) * _tau_reference(x, 5.0) / 300), rel=1e-10)
    assert mean_with_ci(x, z=1.0)[1] == pytest.approx(hw / 1.96, rel=1e-12)
    m3, hw3 = mean_with_ci(np.array([1.0, 2.0, 6.0]))
    assert m3 == 3.0 and math.isnan(hw3)
    m4, hw4 = mean_with_ci([1.0, 2.0, 6.0, 3.0])
    assert m4 == 3.0 and hw4 == pytest.approx(1.96 * math.sqrt(np.var([1, 2, 6, 3], ddof=1) / 4), rel=1e-12)


def test_combine_ci():
    m, hw = combine_ci(np.array([0.2, 0.4, 0.3]), np.array([0.03, 0.04, 0.12]))
    assert m == pytest.approx(0.3, rel=1e-14) and hw == pytest.approx(0.13 / 3, rel=1e-12)
    m1, hw1 = combine_ci([0.25], [0.01])
    assert m1 == 0.25 and hw1 == pytest.approx(0.01)
    assert all(math.isnan(v) for v in combine_ci([], []))


def test_ensemble_scores_against_their_double_sums():
    """The fair energy score and CRPS equal their definitions written as double loops over the members."""
    from danlab.metrics import crps, energy_score
    g = torch.Generator().manual_seed(1)
    E, x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    N, nrm = 5, lambda v: float(v.pow(2).mean().sqrt())
    for b in range(3):
        es = (sum(nrm(E[b, n] - x[b]) for n in range(N)) / N
              - sum(nrm(E[b, n] - E[b, m]) for n in range(N) for m in range(N)) / (2 * N * (N - 1)))
        assert float(energy_score(E, x, eps=0.0)[b]) == pytest.approx(es, rel=1e-12)
        cr = np.mean([sum(abs(float(E[b, n, i] - x[b, i])) for n in range(N)) / N
                      - sum(abs(float(E[b, n, i] - E[b, m, i])) for n in range(N) for m in range(N)) / (2 * N * (N - 1))
                      for i in range(7)])
        assert float(crps(E, x)[b]) == pytest.approx(cr, rel=1e-12)
    # a collapsed ensemble scores its distance to the truth
    c = torch.zeros(1, 4, 7, dtype=torch.float64)
    assert float(energy_score(c, torch.ones(1, 7, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        energy_score(E[:, :1], x)


def test_ensemble_scores_are_proper():
    """Truth and members drawn from N(0, 1) per site: the expected score is smallest at the right spread, where the
    members' mean squared error prefers the collapsed ensemble."""
    from danlab.metrics import crps, energy_score
    g = torch.Generator().manual_seed(2)
    x, Z = torch.randn(4000, 40, generator=g), torch.randn(4000, 10, 40, generator=g)
    for score in (energy_score, crps):
        s = {sd: float(score(sd * Z, x).mean()) for sd in (0.0, 0.7, 1.0, 1.4)}
        assert s[1.0] < min(s[0.7], s[1.4]) and s[0.7] < s[0.0], (score.__name__, s)
    mse = {sd: float((sd * Z - x.unsqueeze(1)).pow(2).mean()) for sd in (0.0, 1.0)}
    assert mse[0.0] < mse[1.0]


# ---------------------------------------------------------------- observations

def test_bcast_views_a_mask_against_any_rank():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert _bcast(mask, torch.zeros(2, 3)).shape == (2, 3)
    assert _bcast(mask, torch.zeros(2, 4, 3)).shape == (2, 1, 3)
    v = _bcast(mask, torch.zeros(2, 4, 5, 3))
    assert v.shape == (2, 1, 1, 3) and torch.equal(v[1, 0, 0], mask[1])


def test_obs_algebra_against_explicit_loops():
    g = gen(7)
    B, N, Nx, sigma = 3, 4, 6, 0.5
    mask = (torch.rand(B, Nx, generator=g) < 0.5).to(f64)
    mask[:, 0] = 1.0
    y = torch.randn(B, Nx, generator=g, dtype=f64) * mask
    o = Obs(y, mask, sigma)
    E = torch.randn(B, N, Nx, generator=g, dtype=f64)
    assert torch.equal(o.Ny, mask.sum(-1)) and o.Rinv == 4.0 and Obs(y, mask, 2.0).Rinv == 0.25
    H, d, z = o.H(E), o.innovation(E), o.HtRinv_innovation(E)
    d1 = o.innovation(E[:, 0])
    for b in range(B):
        for i in range(Nx):
            on = bool(mask[b, i])
            for n in range(N):
                assert float(H[b, n, i]) == (float(E[b, n, i]) if on else 0.0)
                assert float(d[b, n, i]) == (float(y[b, i] - E[b, n, i]) if on else 0.0)
                assert float(z[b, n, i]) == pytest.approx(float(y[b, i] - E[b, n, i]) / sigma**2 if on else 0.0, abs=0)
            assert float(d1[b, i]) == (float(y[b, i] - E[b, 0, i]) if on else 0.0)
    s = o.select([2, 0])
    assert torch.equal(s.y, y[[2, 0]]) and torch.equal(s.mask, mask[[2, 0]]) and s.sigma == sigma


def test_observer_validation_boundaries():
    Observer(5, sigma=1e-6)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"sigma must be > 0"):
            Observer(5, sigma=bad)
    Observer(5, kind="subset", sites=(0, 4))
    for sites in ((), None, (-1, 2), (0, 5), (1, 1)):
        with pytest.raises(ValueError, match=r"sites must be distinct indices in \[0, 4\]"):
            Observer(5, kind="subset", sites=sites)
    Observer(5, kind="random", count=1)
    Observer(5, kind="random", count=5)
    Observer(5, kind="random", count_min=5, count_max=5)
    for kw in (dict(count=0), dict(count=6), dict(count_min=3, count_max=2), dict(count_min=0, count_max=2),
               dict(count_min=2, count_max=6), dict(fraction=0.0)):
        with pytest.raises(ValueError, match=r"random counts must lie in \[1, Nx=5\]"):
            Observer(5, kind="random", **kw)
    with pytest.raises(ValueError, match="needs count, fraction, or count_min and count_max"):
        Observer(5, kind="random", count_min=2)


def test_observer_count_range():
    assert Observer(10, kind="random", count=3).count_range == (3, 3)
    assert Observer(10, kind="random", count=3, fraction=0.9, count_min=1, count_max=9).count_range == (3, 3)
    assert Observer(10, kind="random", fraction=0.26).count_range == (3, 3)  # rounded, not truncated
    assert Observer(10, kind="random", fraction=0.24, count_min=5, count_max=9).count_range == (2, 2)
    assert Observer(10, kind="random", count_min=2, count_max=7).count_range == (2, 7)


def test_masks_identity_and_subset():
    m = Observer(6).mask(3, None, torch.float32, "cpu")
    assert m.dtype == torch.float32 and torch.equal(m, torch.ones(3, 6))
    assert Observer(6).mask(2, None, f64, "cpu").dtype == f64
    s = Observer(6, kind="subset", sites=(1, 4)).mask(2, None, f64, "cpu")
    assert s.dtype == f64 and torch.equal(s, torch.tensor([[0, 1, 0, 0, 1, 0]] * 2, dtype=f64))
    s[0, 0] = 7.0  # each row its own memory (a later per-row edit must not leak into the other rows)
    assert float(s[1, 0]) == 0.0


def test_random_mask_observes_the_sites_of_the_smallest_draws():
    """count = lo + floor(u_count (hi - lo + 1)), and the observed sites are those of the `count` smallest
    uniform draws, row by row: recomputed here from the same seeded stream."""
    Nx, B, lo, hi = 8, 40, 2, 6
    m = Observer(Nx, kind="random", count_min=lo, count_max=hi).mask(B, BatchRNG(3, "obs", B), f64, "cpu")
    u = BatchRNG(3, "obs", B).rand(Nx + 1, dtype=f64)
    for b in range(B):
        count = lo + int(math.floor(float(u[b, -1]) * (hi - lo + 1)))
        sites = sorted(np.argsort(u[b, :-1].numpy())[:count].tolist())
        assert m[b].nonzero().flatten().tolist() == sites
    assert m.dtype == f64 and set(m.sum(-1).long().tolist()) == set(range(lo, hi + 1))
    # u = 1 - 2^-53 for the count draw gives hi, not hi + 1 (the clamp)
    one = Observer(4, kind="random", count_min=1, count_max=3)
    rng = BatchRNG(0, "x", 1)
    rng.rand = lambda *shape, dtype=f64, device="cpu": torch.tensor([[0.1, 0.2, 0.3, 0.4, 1.0]], dtype=dtype)
    assert one.mask(1, rng, f64, "cpu").sum().item() == 3


@pytest.mark.parametrize("kind, kw", [("identity", {}), ("subset", dict(sites=(0, 3))), ("random", dict(count=2))])
def test_observe_is_truth_plus_sigma_noise_on_the_mask(kind, kw):
    B, Nx, sigma = 3, 5, 0.7
    obs = Observer(Nx, sigma=sigma, kind=kind, **kw)
    x = torch.randn(B, Nx, generator=gen(8), dtype=f64)
    o = obs.observe(x, BatchRNG(4, "obs", B, [0, 1, 2]))
    rng = BatchRNG(4, "obs", B, [0, 1, 2])
    mask = obs.mask(B, rng, f64, "cpu")
    noise = rng.randn(Nx, dtype=f64)
    assert o.sigma == sigma and o.y.dtype == f64 and torch.equal(o.mask, mask)
    torch.testing.assert_close(o.y, (x + sigma * noise) * mask, rtol=0, atol=0)
    # every site observed: H is the identity and its products by the mask are skipped, with the same numbers
    assert o.full == (kind == "identity") and o.select([2, 0]).full == o.full
    E = torch.randn(B, 4, Nx, generator=gen(9), dtype=f64)
    assert torch.equal(o.H(E), E * mask.unsqueeze(-2))
    assert torch.equal(o.innovation(E), (o.y.unsqueeze(-2) - E) * mask.unsqueeze(-2))


# ---------------------------------------------------------------- networks

def _reference_net(net: AnalysisNet, E: torch.Tensor, zeta: torch.Tensor, zn=None) -> torch.Tensor:
    """a_theta written with torch.nn.functional from the network's own weights: circular padding of k // 2,
    the four input channels (or zeta alone), residual blocks whose last layer has no activation, then the
    activation, the output layer and the gain on the innovation."""
    c = net.cfg
    B, N, Nx = E.shape
    act = {"gelu": Fn.gelu, "relu": Fn.relu, "tanh": torch.tanh, "silu": Fn.silu, "elu": Fn.elu}[c.activation]
    if c.kind == "linear":
        act = lambda h: h  # noqa: E731

    def conv(h, layer):
        p = c.kernel // 2
        return Fn.conv1d(Fn.pad(h, (p, p), mode="circular"), layer.weight, layer.bias)

    z = zeta[:, None, :].expand(B, N, Nx)
    if c.kind == "simplified":
        h = z.reshape(B * N, 1, Nx)
    else:
        xb = E.mean(1, keepdim=True).expand(B, N, Nx)
        sd = E.std(1, keepdim=True).expand(B, N, Nx) if N > 1 else torch.zeros_like(E)
        h = torch.stack([(E - c.shift) / c.scale, (xb - c.shift) / c.scale, sd / c.scale, z], 2).reshape(B * N, 4, Nx)
    h = conv(h, net.inp)
    for block in net.blocks:
        convs = [m for m in block.f if isinstance(m, torch.nn.Conv1d)]
        r = h
        for i, layer in enumerate(convs):
            r = conv(r, layer)
            if i < len(convs) - 1:
                r = act(r)
        h = h + r
    out = conv(act(h), net.out).view(B, N, Nx)
    return out + net.gain * (zeta[:, None, :] if zn is None else zn)


def _randomised(cfg: NetConfig, seed: int = 0) -> AnalysisNet:
    torch.manual_seed(seed)
    net = build_net(cfg).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("cfg", [
    NetConfig(Nf=3, Nbl=2, Nl=3, kernel=5, activation="gelu", shift=1.5, scale=2.5),
    NetConfig(Nf=2, Nbl=1, Nl=2, kernel=3, activation="tanh"),
    NetConfig(Nf=2, Nbl=1, Nl=1, kernel=7, activation="relu"),
    NetConfig(kind="linear", Nf=3, Nbl=2, Nl=2, kernel=3),
    NetConfig(kind="simplified", Nf=2, Nbl=1, Nl=2, kernel=5, activation="elu"),
    NetConfig(Nf=2, Nbl=0, Nl=1, kernel=3, activation="silu"),
])
@pytest.mark.parametrize("N", [1, 3])
def test_network_equals_its_functional_reference(cfg, N):
    net = _randomised(cfg)
    g = gen(9)
    E, zeta = 3.0 * torch.randn(2, N, 9, generator=g, dtype=f64), torch.randn(2, 9, generator=g, dtype=f64)
    torch.testing.assert_close(net(E, zeta), _reference_net(net, E, zeta), rtol=0, atol=1e-12)
    zn = torch.randn(2, N, 9, generator=g, dtype=f64)
    torch.testing.assert_close(net(E, zeta, zn), _reference_net(net, E, zeta, zn), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind, cin", [("cnn", 4), ("linear", 4), ("simplified", 1)])
def test_network_layers_and_parameter_count(kind, cin):
    cfg = NetConfig(kind=kind, Nf=6, Nbl=3, Nl=4, kernel=5, gain0=0.7)
    net = build_net(cfg)
    assert isinstance(net, AnalysisNet) and net.cfg is cfg
    Nf, k = 6, 5
    expected = (cin * Nf * k + Nf) + 3 * 4 * (Nf * Nf * k + Nf) + (Nf * k + 1) + 1
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net.inp.in_channels == cin and net.out.out_channels == 1 and len(net.blocks) == 3
    for layer in [net.inp, net.out, *[m for b in net.blocks for m in b.f if isinstance(m, torch.nn.Conv1d)]]:
        assert layer.kernel_size == (5,) and layer.padding == (2,) and layer.padding_mode == "circular"
    acts = [type(m).__name__ for m in net.blocks[0].f if not isinstance(m, torch.nn.Conv1d)]
    assert acts == (["Identity"] * 3 if kind == "linear" else ["GELU"] * 3)
    assert isinstance(net.blocks[0].f[-1], torch.nn.Conv1d)
    assert float(net.gain.detach()) == pytest.approx(0.7) and not net.out.weight.any() and not net.out.bias.any()


def test_network_input_checks_and_kernel_size():
    net = build_net(NetConfig(Nf=2, Nbl=1, Nl=1))
    E = torch.randn(2, 3, 10)
    for args in [(torch.randn(2, 10), torch.randn(2, 10)), (E, torch.randn(2, 3, 10)), (E, torch.randn(3, 10)),
                 (E, torch.randn(2, 11))]:
        with pytest.raises(ValueError, match="a_theta expects E"):
            net(*args)
    with pytest.raises(ValueError, match="zeta_members"):
        net(E, torch.randn(2, 10), torch.randn(2, 3, 11))
    NetConfig(kernel=5).check_size(2)
    with pytest.raises(ValueError, match=r"a kernel of 5 needs Nx >= 2 \(circular padding of 2 sites\), got model.Nx=1"):
        NetConfig(kernel=5).check_size(1)
    NetConfig(kernel=1)
    with pytest.raises(ValueError, match=r"must be odd \(got 6\)"):
        NetConfig(kernel=6)
