import pytest
import torch

from danlab.models import Lorenz96
from danlab.observations import Observer
from danlab.rng import BatchRNG
from danlab.twin import TwinStream


def test_tangent_linear_matches_finite_differences():
    m = Lorenz96(Nx=40)
    x = TwinStream(m, Observer(40), 1, seed=3, ids=[0]).x[0]
    v = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, tl = torch.func.jvp(m, (x,), (v,))
    for eps in (1e-4, 1e-5):
        fd = (m(x + eps * v) - m(x - eps * v)) / (2 * eps)
        assert torch.allclose(tl, fd, rtol=0, atol=1e-8)
    # and the adjoint: <M' v, w> = <v, M'^T w>
    w = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, vjp = torch.func.vjp(m, x)
    assert torch.allclose((tl * w).sum(), (v * vjp(w)[0]).sum(), atol=1e-12)


def test_rk4_order_and_steps():
    """steps x dt spans the interval; halving dt reduces the RK4 error ~16x."""
    x = TwinStream(Lorenz96(), Observer(40), 1, seed=0, ids=[0]).x
    ref = Lorenz96(dt=0.05 / 64, substeps=64)(x)
    e1 = (Lorenz96(dt=0.05, substeps=1)(x) - ref).abs().max()
    e2 = (Lorenz96(dt=0.025, substeps=2)(x) - ref).abs().max()
    assert 10 < e1 / e2 < 22


@pytest.mark.parametrize("Nx", [4, 20, 160])
def test_any_size_dtype_and_batch_shape(Nx):
    """Any (..., Nx) batch and float dtype: the shape and dtype are kept, every member is forecast as if alone,
    float32 agrees with float64, and a state made of two copies of one of size Nx is forecast as two copies
    (the model is local and periodic, which is what lets the same code and weights run at other sizes)."""
    m = Lorenz96(Nx=Nx)
    x64 = 3.0 * torch.randn(3, 2, Nx, dtype=torch.float64, generator=torch.Generator().manual_seed(Nx))
    y64 = m(x64)
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype)
        y = m(x)
        assert y.shape == x.shape and y.dtype == dtype
        torch.testing.assert_close(y[1, 0], m(x[1, 0]), rtol=0, atol=0)
        torch.testing.assert_close(y, y64.to(dtype), rtol=1e-5, atol=1e-5)
    double = Lorenz96(Nx=2 * Nx)(torch.cat([x64, x64], -1))
    torch.testing.assert_close(double, torch.cat([y64, y64], -1), rtol=0, atol=1e-12)


def test_invalid_parameters_rejected():
    with pytest.raises(ValueError, match="Nx"):
        Lorenz96(Nx=3)
    with pytest.raises(ValueError, match="dt"):
        Lorenz96(dt=0)
    with pytest.raises(ValueError, match="Nx=40"):
        Lorenz96().tendency(torch.zeros(2, 20))


def test_spinup_reaches_the_attractor():
    x = TwinStream(Lorenz96(), Observer(40), 16, seed=0).x
    assert 2.0 < float(x.mean()) < 2.7 and 3.3 < float(x.std()) < 3.9


def test_same_seed_same_numbers_and_batched_equals_alone():
    obs = Observer(40, kind="random", fraction=0.5)
    a = TwinStream(Lorenz96(), obs, 3, seed=5, ids=[0, 1, 2])
    b = TwinStream(Lorenz96(), obs, 3, seed=5, ids=[0, 1, 2])
    c = TwinStream(Lorenz96(), obs, 1, seed=5, ids=[2])
    for _ in range(5):
        xa, oa = a.step()
        xb, ob = b.step()
        xc, oc = c.step()
        assert torch.equal(xa, xb) and torch.equal(oa.y, ob.y)
        assert torch.equal(xa[2:], xc) and torch.equal(oa.y[2:], oc.y) and torch.equal(oa.mask[2:], oc.mask)
    d = TwinStream(Lorenz96(), obs, 3, seed=6, ids=[0, 1, 2])
    assert not torch.equal(d.step()[0], xa)


def test_observation_operators():
    x = torch.arange(10, dtype=torch.float64).repeat(2, 1)
    rng = BatchRNG(0, "obs", 2, [0, 1])
    o = Observer(10, sigma=0.5, kind="subset", sites=(1, 3, 5)).observe(x, rng)
    assert o.Ny.tolist() == [3, 3] and o.Rinv == 4.0
    assert torch.equal(o.mask[0].nonzero().flatten(), torch.tensor([1, 3, 5]))
    xb = torch.zeros(2, 10, dtype=torch.float64)
    z = o.HtRinv_innovation(xb)
    assert torch.equal(z[:, [0, 2, 4, 6, 7, 8, 9]], torch.zeros(2, 7, dtype=torch.float64))
    assert torch.allclose(z[:, [1, 3, 5]], 4.0 * o.y[:, [1, 3, 5]])
    # noise has the right size: (y - x)/sigma ~ N(0, 1) on the observed sites
    big = torch.zeros(2000, 10, dtype=torch.float64)
    ob = Observer(10, sigma=0.5).observe(big, BatchRNG(0, "obs", 2000))
    assert abs(float((ob.y / 0.5).std()) - 1) < 0.02
    r = Observer(10, kind="random", count_min=2, count_max=6).observe(big, BatchRNG(1, "obs", 2000))
    assert set(r.Ny.long().tolist()) == {2, 3, 4, 5, 6}
    assert abs(float(r.mask.mean(0).std())) < 0.03  # every site equally likely
    # count_by experiment: each experiment keeps its count at every cycle (its id, or its batch row, sets it), the
    # sites still drawn afresh; one experiment alone draws what it draws in a batch
    fixed = Observer(10, kind="random", count_min=2, count_max=6, count_by="experiment")
    rng = BatchRNG(1, "obs", 7)
    masks = [fixed.observe(big[:7], rng).mask for _ in range(3)]
    for m in masks:
        assert torch.equal(m.sum(-1).long(), torch.tensor([2, 3, 4, 5, 6, 2, 3]))
    assert not torch.equal(masks[0], masks[1])
    ids = [8, 3]
    both = fixed.observe(big[:2], BatchRNG(1, "obs", 2, ids))
    assert torch.equal(both.Ny.long(), torch.tensor([2 + 8 % 5, 2 + 3 % 5]))
    alone = fixed.observe(big[:1], BatchRNG(1, "obs", 1, [3]))
    assert torch.equal(alone.mask[0], both.mask[1]) and torch.equal(alone.y[0], both.y[1])
    with pytest.raises(ValueError, match="sigma"):
        Observer(10, sigma=0)
    with pytest.raises(ValueError, match="sites"):
        Observer(10, kind="subset", sites=(3, 12))


def test_tendency_against_an_independent_formula():
    """dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, written site by site with modular indices (no padding,
    no rolls), on random states of several sizes and forcings, and the forecast against RK4 written out."""
    g = torch.Generator().manual_seed(4)
    for Nx, F in ((4, 8.0), (5, -1.5), (40, 8.0), (41, 16.0)):
        m = Lorenz96(Nx=Nx, F=F)
        x = 3.0 * torch.randn(3, Nx, generator=g, dtype=torch.float64)
        ref = torch.empty_like(x)
        for b in range(3):
            for i in range(Nx):
                ref[b, i] = (x[b, (i + 1) % Nx] - x[b, (i - 2) % Nx]) * x[b, (i - 1) % Nx] - x[b, i] + F
        torch.testing.assert_close(m.tendency(x), ref, rtol=0, atol=1e-12)
    m, dt = Lorenz96(Nx=40, dt=0.01, substeps=3), 0.01
    x = 3.0 * torch.randn(40, generator=g, dtype=torch.float64)
    y = x.clone()
    for _ in range(3):
        k1 = m.tendency(y)
        k2 = m.tendency(y + dt / 2 * k1)
        k3 = m.tendency(y + dt / 2 * k2)
        k4 = m.tendency(y + dt * k3)
        y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)
    # the fixed point x = F everywhere: zero tendency
    assert torch.equal(Lorenz96(Nx=10, F=8.0).tendency(torch.full((10,), 8.0, dtype=torch.float64)), torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_numpy_forecast_equals_the_torch_one_bit_for_bit(dtype):
    """Outside autograd a CPU state is integrated in NumPy (Lorenz96._steps): the same numbers as the torch
    RK4, for single states, ensembles and batches, several substeps, a non-contiguous input; with autograd the
    torch path runs and differentiates."""
    model = Lorenz96(Nx=40, substeps=3)
    x = (8 + torch.randn(3, 5, 40, dtype=dtype)).transpose(0, 1)  # not contiguous
    with torch.no_grad():
        fast = model(x)
    torch_path = x
    for _ in range(3):
        torch_path = model.step(torch_path)
    assert fast.dtype == dtype and fast.shape == x.shape and torch.equal(fast, torch_path)
    assert torch.equal(model.spinup(x[0, 0], 1.0), model._steps(x[0, 0].clone().requires_grad_(), 20).detach())
    xg = x.clone().requires_grad_()
    y = model(xg)
    assert y.grad_fn is not None and torch.equal(y.detach(), fast)
    y.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="Nx=40"):
        with torch.no_grad():
            model(torch.zeros(2, 41, dtype=dtype))
