"""The fast paths of issue 19 compute what the plain paths compute: the network's inference path (gathers and
matrix products) against its layers, the EnKF-N's NumPy Newton iterations against the torch ones, the cheaper
finiteness check against the entry-wise one, and a whole learned-filter evaluation against the layer path.
The timings themselves are measured by benchmarks/filter_speed.py, not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danlab.cycle import run_cycles
from danlab.filters.base import rows_ok
from danlab.filters.ensemble import dual_inflation, hyperprior
from danlab.learned import Learned
from danlab.models import Lorenz96
from danlab.nets import AnalysisNet, NetConfig, build_net
from danlab.observations import Observer
from danlab.twin import TwinStream

f64 = torch.float64
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "l96_nf40_ne1"


def trained_like(kind="cnn", seed=0, **kw) -> AnalysisNet:
    """A network with every weight random (the last layer too, which starts at zero), in eval mode."""
    torch.manual_seed(seed)
    net = build_net(NetConfig(kind=kind, **kw))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return net.eval()


def layers(net, *args):
    """The network through its layers (the training path), without autograd."""
    net.train()
    try:
        with torch.no_grad():
            return net(*args)
    finally:
        net.eval()


@pytest.mark.parametrize("kind", ["cnn", "linear", "simplified"])
@pytest.mark.parametrize("B, N, Nx", [(1, 1, 40), (3, 1, 17), (2, 4, 40), (1, 1, 320), (40, 1, 40)])
def test_inference_path_equals_the_layers(kind, B, N, Nx, monkeypatch):
    net = trained_like(kind, Nbl=2, Nl=3)
    calls = []
    infer = AnalysisNet.infer
    monkeypatch.setattr(AnalysisNet, "infer", lambda self, *a: calls.append(1) or infer(self, *a))
    g = torch.Generator().manual_seed(1)
    E = 2.0 + 3.0 * torch.randn(B, N, Nx, generator=g)
    zeta = torch.randn(B, Nx, generator=g)
    zn = torch.randn(B, N, Nx, generator=g) if N > 1 else None
    with torch.no_grad():
        fast = net(E, zeta, zn)
    plain = layers(net, E, zeta, zn)
    assert fast.shape == (B, N, Nx)
    # (40, 1, 40) is cut into runs of rows (MAX_COLUMNS); (3, 1, 17): the kernel wraps a short circle
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    assert calls == [1]  # eval mode without autograd took the inference path, once; the layers did not


def test_training_keeps_the_layers_and_inference_follows_the_weights():
    net = trained_like(Nbl=1, Nl=2)
    E, zeta = torch.randn(2, 1, 40), torch.randn(2, 40)
    net.train()
    assert net(E, zeta).grad_fn is not None  # training differentiates through the layers
    net.eval()
    assert net(E, zeta).grad_fn is not None  # so does any call with autograd on (diagnostics, Jacobians)
    with torch.no_grad():
        before = net(E, zeta)
        net.out.weight.mul_(2.0)  # an optimiser step, in place: the cached matrices are views and follow
        after = net(E, zeta)
    assert not torch.equal(before, after)
    plain = layers(net, E, zeta)  # (its GELU may be oneDNN's, the inference path's ATen's: a few ulp apart)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    net64 = net.to(f64)  # new storage: the matrices are rebuilt
    with torch.no_grad():
        torch.testing.assert_close(net64(E.to(f64), zeta.to(f64)), layers(net64, E.to(f64), zeta.to(f64)),
                                   rtol=1e-12, atol=1e-12)


def test_learned_evaluation_equals_the_layer_path_to_round_off(monkeypatch):
    """A whole evaluation of the shipped network (300 cycles, 3 experiments, float32 like every evaluation of a
    network): the analysis RMSE per cycle stays within float32 round-off of the layer path (the filter damps the
    differences instead of letting the chaos amplify them), and the aRMSE agrees to 1e-6."""
    model, observer = Lorenz96(Nx=40), Observer(40)
    filt = Learned(checkpoint=str(WEIGHTS)).prepare(model, observer, torch.float32, "cpu")

    def run():
        ids = [0, 1, 2]
        twin = TwinStream(model, observer, 3, 5, ids=ids, dtype=torch.float32, spinup_time=5.0)
        return run_cycles(filt, model, twin, 300, 50, 5, ids=ids)

    fast = run()
    monkeypatch.setattr(AnalysisNet, "infer", lambda self, *a: layers(self, *a))
    plain = run()
    assert not fast.diverged.any() and fast.scores()["armse"] < 0.3
    np.testing.assert_allclose(fast.rmse_a, plain.rmse_a, rtol=0, atol=1e-4)
    assert abs(fast.scores()["armse"] - plain.scores()["armse"]) < 1e-6


def test_dual_inflation_numpy_iterations_equal_the_torch_ones():
    g = torch.Generator().manual_seed(2)
    for B, N in ((1, 20), (64, 40), (3, 4)):
        lam = 5 * torch.rand(B, N, generator=g, dtype=f64)
        q = 3 * torch.rand(B, N, generator=g, dtype=f64)
        eps, c = hyperprior(lam, N, 2.0)
        for max_iter in (1, 2, 40):
            u_np = dual_inflation(lam, q, eps, c, max_iter=max_iter)  # CPU, no autograd: NumPy
            with torch.enable_grad():  # a tensor that needs its gradient: the torch iterations
                u_t = dual_inflation(lam.clone().requires_grad_(True), q, eps, c, max_iter=max_iter).detach()
            assert u_np.shape == u_t.shape == (B, 1) and u_np.dtype == f64
            torch.testing.assert_close(u_np, u_t, rtol=1e-14, atol=0)
    lam[1] = float("nan")  # a blown-up row stops at once and leaves the others as they were
    u = dual_inflation(lam, q, eps, c)
    assert torch.isfinite(u[[0, 2]]).all()
    torch.testing.assert_close(u[[0, 2]], dual_inflation(lam[[0, 2]], q[[0, 2]], eps[[0, 2]], c[[0, 2]]),
                               rtol=0, atol=0)


def test_dual_inflation_of_a_row_does_not_depend_on_its_batch():
    """Each row stops iterating where it would alone: a batch of rows needing different iteration counts gives,
    row by row, exactly the one-row results (a converged row that kept taking sub-tolerance steps while the others
    converged would differ in its last bits, and a restarted experiment would change its healthy neighbours)."""
    g = torch.Generator().manual_seed(5)
    B, N = 32, 20
    lam = 10 * torch.rand(B, N, generator=g, dtype=f64) ** 3
    q = 20 * torch.rand(B, N, generator=g, dtype=f64) ** 2
    eps, c = hyperprior(lam, N, 2.0)
    for grad in (False, True):  # the NumPy iterations and the torch ones
        with torch.enable_grad():
            lam_ = lam.clone().requires_grad_(grad)
            u = dual_inflation(lam_, q, eps, c).detach()
            alone = torch.cat([dual_inflation(lam_[b:b + 1], q[b:b + 1], eps[b:b + 1], c[b:b + 1]).detach()
                               for b in range(B)])
        assert torch.equal(u, alone), grad


def test_one_row_iterations_equal_the_batched_ones_bit_for_bit():
    """One experiment iterates with Python floats (`_newton_one_row`): the same numbers as its row in a batch, bit
    for bit, for every iteration count and for rows that blow up, start at the minimum, or need clipped steps."""
    g = torch.Generator().manual_seed(7)
    B, N = 12, 20
    lam = 10 * torch.rand(B, N, generator=g, dtype=f64) ** 3
    q = 20 * torch.rand(B, N, generator=g, dtype=f64) ** 2
    lam[1, 3], q[2, 0], lam[3] = float("nan"), float("inf"), 0.0  # blown up; infinite; no constraint at all
    q[4] = 0.0  # g = c - eps at t = 0
    q[5] *= 1e6  # far from t = 0: clipped steps of 1
    eps, c = hyperprior(lam, N, 2.0)
    eps[6], c[7] = float("nan"), -float("inf")
    for max_iter in (1, 2, 3, 40):
        u = dual_inflation(lam, q, eps, c, max_iter=max_iter)
        alone = torch.cat([dual_inflation(lam[b:b + 1], q[b:b + 1], eps[b:b + 1], c[b:b + 1], max_iter=max_iter)
                           for b in range(B)])
        assert torch.equal(u.isnan(), alone.isnan()) and torch.equal(u.nan_to_num(), alone.nan_to_num()), max_iter
    assert torch.isfinite(u[[0, 3, 4, 5]]).all() and u[5] > 100


def test_rows_ok_by_the_largest_magnitude_is_the_entrywise_check():
    t = torch.randn(6, 3, 4, dtype=f64)
    t[1, 0, 0], t[2, 2, 3], t[3, 1, 1], t[4] = float("nan"), float("inf"), -float("inf"), 1e308  # 4: huge, finite
    assert rows_ok(t).tolist() == torch.isfinite(t).flatten(1).all(-1).tolist() == [True, False, False, False, True,
                                                                                     True]
    assert rows_ok(torch.zeros(2, 0)).tolist() == [True, True]


def test_a_copy_of_the_network_infers_with_its_own_weights():
    """The inference path's cached weight matrices are views of one network's parameters: a copy (the trainer's
    weight average is a deepcopy) must not carry them, or it would infer with the original's weights."""
    import copy

    net = trained_like(Nbl=1, Nl=2)
    E, zeta = torch.randn(2, 1, 40), torch.randn(2, 40)
    with torch.no_grad():
        before = net(E, zeta)  # builds the caches
        twin = copy.deepcopy(net)
        twin.out.weight.mul_(3.0)
        torch.testing.assert_close(net(E, zeta), before, rtol=0, atol=0)  # the original is untouched
        plain = layers(twin, E, zeta)
        torch.testing.assert_close(twin(E, zeta), plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
        assert not torch.allclose(twin(E, zeta), before)
