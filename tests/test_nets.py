import pytest
import torch

from danlab.nets import NetConfig, build_net


def _trained_like(cfg: NetConfig):
    """A network with non-trivial (random) weights everywhere, the last layer included."""
    torch.manual_seed(0)
    net = build_net(cfg).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("Ne", [1, 4])
@pytest.mark.parametrize("Nx", [20, 40, 160])
@pytest.mark.parametrize("kind", ["cnn", "linear", "simplified"])
def test_shapes(Ne, Nx, kind):
    """(B, Ne, Nx) in and out at any Nx and Ne, each experiment computed as if alone, and the same weights at
    twice the size: a state made of two copies gives two copies of the increment (fully convolutional with
    circular padding: the transdimensional transfer rests on this)."""
    net = _trained_like(NetConfig(kind=kind, Nf=8, Nbl=2, Nl=2))
    g = torch.Generator().manual_seed(Nx + Ne)
    E, z = torch.randn(3, Ne, Nx, generator=g, dtype=torch.float64), torch.randn(3, Nx, generator=g, dtype=torch.float64)
    out = net(E, z)
    assert out.shape == (3, Ne, Nx) and torch.isfinite(out).all()
    torch.testing.assert_close(out[2:], net(E[2:], z[2:]), rtol=0, atol=1e-12)
    torch.testing.assert_close(net(E.repeat(1, 1, 2), z.repeat(1, 2)), out.repeat(1, 1, 2), rtol=0, atol=1e-12)
    assert out.abs().max() > 1e-3  # not the zero map


@pytest.mark.parametrize("kind", ["cnn", "linear", "simplified"])
def test_circular_equivariance(kind):
    net = _trained_like(NetConfig(kind=kind, Nf=8, Nbl=2, Nl=2))
    E, z = torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    for s in (1, 7, 39):
        shifted = net(E.roll(s, -1), z.roll(s, -1))
        assert torch.allclose(shifted, net(E, z).roll(s, -1), atol=1e-12)


@pytest.mark.parametrize("kind", ["cnn", "linear", "simplified"])
def test_reflect_averages_over_the_reflection_and_is_equivariant(kind):
    """net.reflect: a(E, zeta) = [a_1(E, zeta) + R a_1(R E, R zeta)] / 2 with the same weights a_1 of the plain
    network, (R u)_j = -u_{-j}; so a(R E, R zeta, R zeta_n) = R a(E, zeta, zeta_n) on the layers (training) and on
    the inference path alike, which the plain network is not; the precision channel reflects without the sign."""
    from danlab.nets.cnn import reflect
    plain = _trained_like(NetConfig(kind=kind, Nf=8, Nbl=2, Nl=2, precision_input=kind != "simplified"))
    sym = build_net(plain.cfg.model_copy(update={"reflect": True})).double()
    sym.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    E, z, zn = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 2, 40), (3, 40), (3, 2, 40)])
    prec = (torch.rand(3, 40, generator=g, dtype=torch.float64) > 0.5).double()
    args = (E, z, zn, prec) if plain.cfg.precision_input else (E, z, zn)
    mirrored = tuple(reflect(t, 1.0 if t is prec else -1.0) for t in args)
    for train in (True, False):
        for net in (plain, sym):
            net.train(train)
        with torch.set_grad_enabled(train):
            a, a_r = sym(*args), sym(*mirrored)
            torch.testing.assert_close(a_r, reflect(a), rtol=0, atol=1e-12)
            torch.testing.assert_close(a, 0.5 * (plain(*args) + reflect(plain(*mirrored))), rtol=0, atol=1e-12)
            assert not torch.allclose(plain(*mirrored), reflect(plain(*args)), atol=1e-3)
            if kind != "simplified":  # the average is a new function of E (simplified sees zeta only, which is linear)
                assert not torch.allclose(a, plain(*args), atol=1e-3)


@pytest.mark.parametrize("W", [1, 5])
def test_gated_gain_is_a_local_state_dependent_gain_on_each_members_innovation(W):
    """net.gate = W: a_i += sum_j G_j,i zeta_n,(i + j - W // 2), with G the W output channels of a convolution of the
    last hidden layer: zero at the start (the network without the gate, to the bit), then the explicit sum over
    circular shifts on both paths (layers, inference), linear in zeta_n at a fixed E and zeta, and still shift-
    and reflection-equivariant (net.reflect)."""
    from danlab.nets.cnn import reflect
    fresh = build_net(NetConfig(Nf=8, Nbl=2, Nl=2, gate=W)).double()
    plain = build_net(NetConfig(Nf=8, Nbl=2, Nl=2)).double()
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("gate.")})
    g = torch.Generator().manual_seed(W)
    E, z, zn = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 2, 40), (3, 40), (3, 2, 40)])
    assert torch.equal(fresh(E, z, zn), plain(E, z, zn))
    net = _trained_like(NetConfig(Nf=8, Nbl=2, Nl=2, gate=W))
    with torch.no_grad():
        h = net.act(net.blocks(net.inp(net.features(E, z))))
        G = net.gate(h).view(3, 2, W, 40)
        by_hand = net.out(h).view(3, 2, 40) + net.gain * zn
        for j in range(W):
            by_hand = by_hand + G[:, :, j] * zn.roll(W // 2 - j, -1)  # zn.roll(s)[i] = zn[i - s]
    assert G.abs().max() > 1e-2 and not torch.allclose(net(E, z, zn), plain(E, z, zn), atol=1e-3)
    for train in (True, False):
        net.train(train)
        with torch.set_grad_enabled(train):
            torch.testing.assert_close(net(E, z, zn), by_hand, rtol=0, atol=1e-12)
            # linear in the members' innovations where E and zeta stay
            lin = net(E, z, 2.0 * zn) - 2.0 * net(E, z, zn) + net(E, z, 0 * zn)
            torch.testing.assert_close(lin, torch.zeros_like(lin), rtol=0, atol=1e-12)
            torch.testing.assert_close(net(E.roll(7, -1), z.roll(7, -1), zn.roll(7, -1)), net(E, z, zn).roll(7, -1),
                                       rtol=0, atol=1e-12)
    sym = build_net(net.cfg.model_copy(update={"reflect": True})).double()
    sym.load_state_dict(net.state_dict())
    sym.eval()
    with torch.no_grad():
        torch.testing.assert_close(sym(reflect(E), reflect(z), reflect(zn)), reflect(sym(E, z, zn)), rtol=0, atol=1e-12)
    for bad, msg in [({"gate": 4}, "must be odd"), ({"gate": 3, "kind": "linear"}, "only the kind cnn")]:
        with pytest.raises(ValueError, match=msg):
            NetConfig(**bad)
    with pytest.raises(ValueError, match="net.gate: a gain 9 sites wide needs Nx >= 9"):
        NetConfig(gate=9).check_size(8)


def test_reflect_is_refused_where_the_model_has_no_such_symmetry():
    from pydantic import ValidationError

    from danlab.config import ConfigError, load_config
    from danlab.training.train_config import TrainRunConfig
    with pytest.raises(ValidationError, match="net.reflect: only the 1-D kinds"):
        NetConfig(kind="sphere", nlat=8, reflect=True)
    with pytest.raises(ConfigError, match="net.reflect: the model Lorenz96 is not symmetric") as err:
        load_config(TrainRunConfig, None, ["net.reflect=true"])
    assert "\n" not in str(err.value)
    load_config(TrainRunConfig, None, ["net.reflect=true", "model.name=ks"])  # KS has it


def test_member_permutation_equivariance():
    net = _trained_like(NetConfig(Nf=8, Nbl=1, Nl=2))
    E, z = torch.randn(2, 5, 40, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(net(E[:, perm], z), net(E, z)[:, perm], atol=1e-12)


def test_linear_variant_is_affine_and_cnn_is_not():
    lin = _trained_like(NetConfig(kind="linear", Nf=8, Nbl=2, Nl=3))
    cnn = _trained_like(NetConfig(kind="cnn", Nf=8, Nbl=2, Nl=3, activation="tanh"))
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(2, 1, 40, dtype=torch.float64, generator=g), torch.randn(2, 40, dtype=torch.float64, generator=g)]
    b = [torch.randn(2, 1, 40, dtype=torch.float64, generator=g), torch.randn(2, 40, dtype=torch.float64, generator=g)]
    for lam in (0.3, 2.5):
        mix = [lam * u + (1 - lam) * v for u, v in zip(a, b)]
        assert torch.allclose(lin(*mix), lam * lin(*a) + (1 - lam) * lin(*b), atol=1e-10)
        assert not torch.allclose(cnn(*mix), lam * cnn(*a) + (1 - lam) * cnn(*b), atol=1e-4)


def test_simplified_ignores_the_state_and_untrained_is_a_gain():
    net = _trained_like(NetConfig(kind="simplified", Nf=8, Nbl=1, Nl=2))
    z = torch.randn(2, 40, dtype=torch.float64)
    assert torch.equal(net(torch.randn(2, 1, 40, dtype=torch.float64), z), net(torch.zeros(2, 1, 40, dtype=torch.float64), z))
    fresh = build_net(NetConfig(gain0=0.3))
    E, z = torch.randn(2, 1, 40), torch.randn(2, 40)
    assert torch.allclose(fresh(E, z), 0.3 * z.unsqueeze(1))


def test_bad_inputs_and_config():
    net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1))
    with pytest.raises(ValueError, match="expects E"):
        net(torch.randn(2, 40), torch.randn(2, 40))
    with pytest.raises(ValueError, match="odd"):
        NetConfig(kernel=4)


def test_untrained_network_nudges_each_member_with_its_own_innovation():
    fresh = build_net(NetConfig(gain0=0.3))
    E, z, zn = torch.randn(2, 4, 40), torch.randn(2, 40), torch.randn(2, 4, 40)
    assert torch.allclose(fresh(E, z, zn), 0.3 * zn)
    with pytest.raises(ValueError, match="zeta_members"):
        fresh(E, z, zn[:, :2])
