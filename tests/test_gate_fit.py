"""The least-squares fit of a gated gain (danlab.training.gate_fit): its design matrix is the gate's term, exactly."""

import torch

from danlab.nets import NetConfig, build_net
from danlab.nets.cnn import gated
from danlab.training.gate_fit import NormalEquations, design, hidden, pack, unpack


def _net(W=5, K=5):
    torch.manual_seed(0)
    net = build_net(NetConfig(Nf=6, Nbl=1, Nl=2, kernel=K, gate=W)).double()
    return net


def test_design_matrix_times_the_packed_gate_is_the_gated_term():
    """Phi @ pack(gate) = gated(gate(h), zeta) for a random gate, odd widths and kernels, Nx 40 and 12 (the wrap)."""
    for W, K, Nx in [(5, 5, 40), (9, 3, 12), (1, 5, 40)]:
        net = _net(W, K)
        with torch.no_grad():
            net.gate.weight.normal_(), net.gate.bias.normal_()
            E, zeta = 3 + 2 * torch.randn(4, 1, Nx, dtype=torch.float64), torch.randn(4, Nx, dtype=torch.float64)
            h, base = hidden(net, E, zeta)
            ref = gated(net.gate(h).view(4, 1, W, Nx), zeta.unsqueeze(1))[:, 0]
            got = (design(h, zeta, W, K) @ pack(net.gate)).view(4, Nx)
            assert torch.allclose(got, ref, rtol=0, atol=1e-12)
            # and the body's increment is the network's without its gate: the whole increment is base + the term
            assert torch.allclose(net(E, zeta)[:, 0], base[:, 0] + ref, rtol=0, atol=1e-12)


def test_normal_equations_recover_a_planted_gate():
    """Targets made by a known gate (no noise): the fit returns it (to round-off) with a negligible ridge, its
    residual is zero, and the residual without the gate is the targets' mean square; unpack writes it back."""
    net = _net()
    with torch.no_grad():
        planted = torch.randn_like(pack(net.gate))
        ne = NormalEquations(planted.numel())
        for _ in range(8):
            E, zeta = 3 + 2 * torch.randn(16, 1, 40, dtype=torch.float64), torch.randn(16, 40, dtype=torch.float64)
            h, _ = hidden(net, E, zeta)
            Phi = design(h, zeta, 5, 5)
            ne.add(Phi, Phi @ planted)
        theta = ne.solve(1e-14)
    assert torch.allclose(theta, planted, atol=1e-6)
    assert abs(ne.mse(theta)) < 1e-8 * ne.rr / ne.rows
    unpack(theta, net.gate)
    assert torch.allclose(pack(net.gate), planted, atol=1e-6)
