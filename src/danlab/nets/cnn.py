"""The learned analysis a_theta: a residual 1-D CNN with circular padding, and its variants.

E^a = E^f + a_theta(E^f, zeta), zeta = H^T R^-1 (y - H x̄^f) in state space.

How members enter: the same network is applied to every member n (members are folded into the batch),
with four input channels per site: the member x_n, the ensemble mean x̄, the ensemble standard deviation
(zero for a single member) and zeta. The increment is therefore per member, the network is equivariant
under permutations of the members, and one set of weights serves every ensemble size Ne (Ne = 1
included). Being fully convolutional with circular padding, it also serves every Nx.

Variants: 'cnn' (the reference residual CNN), 'linear' (the same layers without activations: an affine
map of its inputs), 'simplified' (sees only zeta, not E^f). With `precision_input` the first two see a fifth
channel, the observation precision of each site, diag(H^T R^-1 H) (sigma^-2 where observed, 0 elsewhere): zeta
alone cannot tell an unobserved site from an observed one whose innovation is 0, so a network trained on sparse,
time-varying networks has to hedge between the two; with this channel it need not.

With `reflect` the increment is averaged over the reflection R u_j = -u_{-j} (x -> -x, u -> -u), a symmetry of the
Kuramoto–Sivashinsky dynamics (M(R u) = R M(u)) and of its identity observations with white noise: the averaged
network a(E, zeta) = [a_1(E, zeta) + R a_1(R E, R zeta)] / 2 is exactly equivariant, a(R E, R zeta) = R a(E, zeta), as
the best analysis of such a twin is. Averaging a map over the group of a symmetric problem never raises its expected
squared error against an equivariant target (Jensen), and removes the part of the learned map that breaks the
symmetry. It costs two evaluations (one call on a doubled batch). Only models that declare the symmetry
(`reflection_symmetric`) take it; Lorenz 96 has none (its advection x_{i-1}(x_{i+1} - x_{i-2}) is not mirror-symmetric).

The output for member n is g * zeta_n + CNN(...), with zeta_n = H^T R^-1 (y - H x_n) the member's own
innovation (zeta_n = zeta for a single state), a learnable scalar gain g initialised at `gain0`, and the
last convolution initialised at zero: at step 0 the analysis is a stable nudging of every member towards
the observations (so the untrained network does not let the trajectories diverge, nor the members drift
apart), and training learns the rest. The CNN itself sees zeta, from the ensemble mean.

With `gate` = W > 0 (odd; kind cnn) the output also has a gated gain: W more output channels G_j (a convolution of
the last hidden layer, initialised at zero like the output layer) multiply the member's innovation at the W sites
around each site, a_i += sum_j G_j,i(E, zeta) zeta_n,(i + j - W // 2): a state-dependent local gain, the form
K(x^f) zeta of a Kalman-type analysis (that a_theta is close to, see the operator expansion), which a stack of
convolutions and pointwise activations can only approximate through its nonlinearities (a product of its inputs
is not in their span). At step 0 the network computes what it does without the gate.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "elu": nn.ELU}


class NetConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["cnn", "linear", "simplified"] = "cnn"
    Nf: int = Field(40, ge=1, description="number of filters")
    Nbl: int = Field(5, ge=0, description="number of residual blocks")
    Nl: int = Field(5, ge=1, description="convolutional layers per block")
    kernel: int = Field(5, ge=1, description="kernel size (odd)")
    activation: Literal["gelu", "relu", "tanh", "silu", "elu"] = "gelu"
    gain0: float = Field(0.3, description="initial gain on zeta")
    shift: float = Field(2.3, description="state normalisation: (x - shift) / scale")
    scale: float = Field(3.6, gt=0, description="state normalisation: (x - shift) / scale")
    precision_input: bool = Field(False, description="a fifth input channel: the observation precision per site, "
                                  "diag(H^T R^-1 H) (sigma^-2 where observed, 0 elsewhere), for sparse, time-varying "
                                  "networks (kinds cnn and linear)")
    reflect: bool = Field(False, description="average the increment over the reflection u_j -> -u_{-j} (x -> -x, "
                          "u -> -u), an exact symmetry of models that declare it (ks): the analysis becomes "
                          "equivariant, at twice the cost")
    gate: int = Field(0, ge=0, description="width W (odd) of a gated gain: W output channels G_j, zero at the start, "
                      "multiply the member's innovation at the W sites around each site, a += sum_j G_j zeta_(i+j-W//2) "
                      "(a state-dependent local gain); 0: none (kind cnn)")

    @model_validator(mode="after")
    def _precision_kinds(self):
        if self.precision_input and self.kind not in ("cnn", "linear"):
            raise ValueError(f"net.precision_input: only the kinds cnn and linear take it (got kind {self.kind})")
        if self.reflect and self.kind not in ("cnn", "linear", "simplified"):
            raise ValueError(f"net.reflect: only the 1-D kinds cnn, linear and simplified take it (got kind {self.kind})")
        if self.gate and self.kind != "cnn":
            raise ValueError(f"net.gate: only the kind cnn takes a gated gain (got kind {self.kind})")
        if self.gate % 2 == 0 and self.gate:
            raise ValueError(f"net.gate: the gain's width must be odd, centred on the site (got {self.gate})")
        return self

    def check_model(self, model) -> None:
        """Refuse net.reflect for a model whose dynamics are not symmetric under u_j -> -u_{-j}."""
        if self.reflect and not getattr(model, "reflection_symmetric", False):
            raise ValueError(f"net.reflect: the model {type(model).__name__} is not symmetric under the reflection "
                             f"u_j -> -u_(-j) (only models that declare reflection_symmetric are, e.g. ks)")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, k):
        if k % 2 == 0:
            raise ValueError(f"must be odd (got {k})")
        return k

    def check_size(self, Nx: int) -> None:
        """Refuse a state size the circular padding cannot wrap: kernel // 2 must not exceed Nx."""
        if self.kernel // 2 > Nx:
            raise ValueError(f"net.kernel: a kernel of {self.kernel} needs Nx >= {self.kernel // 2} "
                             f"(circular padding of {self.kernel // 2} sites), got model.Nx={Nx}")
        if self.gate > Nx:
            raise ValueError(f"net.gate: a gain {self.gate} sites wide needs Nx >= {self.gate}, got model.Nx={Nx}")


def reflect(u: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
    """R u along the last axis, a periodic grid of Nx sites: (R u)_j = sign * u_{(-j) mod Nx} (site 0 stays, site j
    swaps with Nx - j). With sign -1 the reflection of a state or an innovation under x -> -x, u -> -u; with +1 that
    of a field that does not change sign (the observation precision). An involution: R R u = u."""
    return sign * u.flip(-1).roll(1, -1)


def gated(G: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_j G[..., j, i] z[..., (i + j - W // 2) mod Nx]: the local gains G (..., W, Nx) applied to z (..., Nx)."""
    W = G.shape[-2]
    r = W // 2
    zp = torch.cat([z[..., z.shape[-1] - r:], z, z[..., :r]], -1) if r else z
    return (G.transpose(-1, -2) * zp.unfold(-1, W, 1)).sum(-1)


def _conv(cin: int, cout: int, k: int) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular")


class _Block(nn.Module):
    def __init__(self, Nf: int, Nl: int, k: int, act):
        super().__init__()
        layers = []
        for i in range(Nl):
            layers.append(_conv(Nf, Nf, k))
            if i < Nl - 1:
                layers.append(act())
        self.f = nn.Sequential(*layers)

    def forward(self, h):
        return h + self.f(h)


class AnalysisNet(nn.Module):
    """a_theta(E, zeta[, zeta_members]): E (B, N, Nx), zeta (B, Nx), zeta_members (B, N, Nx) -> increment (B, N, Nx)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        act = nn.Identity if cfg.kind == "linear" else ACTIVATIONS[cfg.activation]
        cin = 1 if cfg.kind == "simplified" else 4 + cfg.precision_input
        self.inp = _conv(cin, cfg.Nf, cfg.kernel)
        self.blocks = nn.Sequential(*[_Block(cfg.Nf, cfg.Nl, cfg.kernel, act) for _ in range(cfg.Nbl)])
        self.act = act()
        self.out = _conv(cfg.Nf, 1, cfg.kernel)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = nn.Parameter(torch.tensor(float(cfg.gain0)))
        if cfg.gate:
            self.gate = _conv(cfg.Nf, cfg.gate, cfg.kernel)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def features(self, E: torch.Tensor, zeta: torch.Tensor, prec: torch.Tensor | None = None) -> torch.Tensor:
        """Input channels (B*N, C, Nx)."""
        B, N, Nx = E.shape
        z = zeta.unsqueeze(1).expand(B, N, Nx)
        if self.cfg.kind == "simplified":
            return z.reshape(B * N, 1, Nx)
        c = self.cfg
        xb = E.mean(1, keepdim=True)
        sd = E.std(1, keepdim=True) if N > 1 else torch.zeros_like(xb)
        chans = [(E - c.shift) / c.scale, ((xb - c.shift) / c.scale).expand_as(E), (sd / c.scale).expand_as(E), z]
        if c.precision_input:
            chans.append(prec.unsqueeze(1).expand(B, N, Nx))
        return torch.stack(chans, 2).reshape(B * N, len(chans), Nx)

    def _check_inputs(self, E, zeta, zeta_members, prec) -> None:
        if E.dim() != 3 or zeta.dim() != 2 or zeta.shape[0] != E.shape[0] or zeta.shape[-1] != E.shape[-1]:
            raise ValueError(f"a_theta expects E (B, N, Nx) and zeta (B, Nx); got {tuple(E.shape)} and {tuple(zeta.shape)}")
        if zeta_members is not None and zeta_members.shape != E.shape:
            raise ValueError(f"a_theta expects zeta_members of the shape of E {tuple(E.shape)}; got {tuple(zeta_members.shape)}")
        if self.cfg.precision_input and (prec is None or prec.shape != zeta.shape):
            got = "none" if prec is None else f"shape {tuple(prec.shape)}"
            raise ValueError(f"this a_theta (net.precision_input) takes the observation precision diag(H^T R^-1 H) "
                             f"of each site, shaped like zeta {tuple(zeta.shape)}; got {got}")

    def forward(self, E: torch.Tensor, zeta: torch.Tensor, zeta_members: torch.Tensor | None = None,
                prec: torch.Tensor | None = None) -> torch.Tensor:
        """prec: the observation precision of each site (B, Nx), for a network with net.precision_input only."""
        self._check_inputs(E, zeta, zeta_members, prec)
        if not self.training and not torch.is_grad_enabled():
            return self.infer(E, zeta, zeta_members, prec)
        return self._reflected(self._layers, E, zeta, zeta_members, prec)

    def _reflected(self, f, E, zeta, zeta_members, prec) -> torch.Tensor:
        """f(E, zeta, zeta_members, prec), averaged over the reflection if net.reflect: one call of f on the batch
        followed by its reflection, [f(E, ...) + R f(R E, ...)] / 2."""
        if not self.cfg.reflect:
            return f(E, zeta, zeta_members, prec)
        two = lambda t, sign=-1.0: None if t is None else torch.cat([t, reflect(t, sign)])  # noqa: E731
        a, b = f(two(E), two(zeta), two(zeta_members), two(prec, 1.0)).chunk(2)
        return 0.5 * (a + reflect(b))

    def hidden(self, E: torch.Tensor, zeta: torch.Tensor, prec: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer h (B*N, Nf, Nx), which the output layer and the gate read (by the layers)."""
        return self.act(self.blocks(self.inp(self.features(E, zeta, prec))))

    def _layers(self, E, zeta, zeta_members, prec) -> torch.Tensor:
        """The network by its layers (training, autograd)."""
        B, N, Nx = E.shape
        h = self.hidden(E, zeta, prec)
        da = self.out(h).view(B, N, Nx)
        zn = zeta.unsqueeze(1) if zeta_members is None else zeta_members
        if self.cfg.gate:
            da = da + gated(self.gate(h).view(B, N, self.cfg.gate, Nx), zn)
        return da + self.gain * zn

    # ---- inference --------------------------------------------------------------------------------
    # The same function as the layers above (equal to float round-off: the sums run in another order), for
    # evaluation (eval mode, no autograd), where a cycle of one small state costs per-call overhead, not
    # arithmetic: at Nx 40 the 27 convolutions do 17 MFLOP, and nn.Conv1d with circular padding spends
    # ~100 us per layer padding and dispatching. Here the activations live as one (C, rows * Nx) matrix
    # (rows = B * N), and each convolution is one gather of its k circular shifts, (C * k, rows * Nx) from a
    # cached index, and one matrix product with the weights viewed as (C_out, C_in * k): 2 calls per
    # layer, whatever B and N. Training keeps the layers (the same parameters, so the same saved weights).
    # The weight matrices are views of the parameters, cached until the parameters may move to new storage
    # (.to(), .float(): _apply) or the mode changes (train()/eval(), which every validation goes through); a
    # copy of the network (deepcopy, pickling) does not carry them.

    _CACHES = ("_taps_cache", "_plan")

    def _drop_caches(self) -> None:
        for name in self._CACHES:
            self.__dict__.pop(name, None)

    def _apply(self, fn, *args, **kwargs):
        self._drop_caches()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._drop_caches()
        return super().train(mode)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def _taps(self, rows: int, Nx: int, device) -> torch.Tensor:
        """Index (k * rows * Nx,): entry (j, r, i) is the column r * Nx + (i + j - k // 2) mod Nx."""
        key = (rows, Nx, device)
        cache = self.__dict__.setdefault("_taps_cache", {})
        idx = cache.get(key)
        if idx is None:
            k = self.cfg.kernel
            i = torch.arange(Nx)
            shift = (i.unsqueeze(0) + torch.arange(k).unsqueeze(1) - k // 2) % Nx  # (k, Nx)
            idx = (torch.arange(rows).view(1, rows, 1) * Nx + shift.unsqueeze(1)).reshape(-1).to(device)
            if len(cache) > 16:  # a few shapes in use at a time (evaluation, validation); never grows unbounded
                cache.clear()
            cache[key] = idx
        return idx

    def _matrices(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each convolution's weights as (C_out, C_in * k) and bias as (C_out, 1), in order: views of the
        parameters, so they follow in-place updates (an optimiser step, load_state_dict, the weight average)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            convs = [self.inp, *(l for b in self.blocks for l in b.f[::2]), self.out, *([self.gate] if self.cfg.gate else [])]
            plan = self.__dict__["_plan"] = [(c.weight.detach().view(c.weight.shape[0], -1), c.bias.detach().unsqueeze(1))
                                             for c in convs]
        return plan

    def infer(self, E: torch.Tensor, zeta: torch.Tensor, zeta_members: torch.Tensor | None = None,
              prec: torch.Tensor | None = None) -> torch.Tensor:
        """forward() without autograd, by gathers and matrix products (see above); E (B, N, Nx) -> (B, N, Nx)."""
        return self._reflected(self._infer, E, zeta, zeta_members, prec)

    def _infer(self, E, zeta, zeta_members, prec) -> torch.Tensor:
        B, N, Nx = E.shape
        rows = B * N
        c = self.cfg
        if c.kind == "simplified":
            x = zeta.unsqueeze(0).unsqueeze(2).expand(1, B, N, Nx).reshape(1, rows * Nx)
        else:
            e = (E - c.shift) / c.scale
            if N > 1:
                xb, sd = (E.mean(1, keepdim=True) - c.shift) / c.scale, E.std(1, keepdim=True) / c.scale
            else:  # a single member is its own mean (to the bit), with no spread
                xb, sd = e, torch.zeros_like(e)
            chans = [e, xb.expand_as(E), sd.expand_as(E), zeta.unsqueeze(1).expand(B, N, Nx)]
            if c.precision_input:
                chans.append(prec.unsqueeze(1).expand(B, N, Nx))
            x = torch.stack(chans).view(len(chans), rows * Nx)
        # past ~1,000 columns the gathered (C * k, columns) matrix leaves the cache and the product slows down
        # (measured: 22 GFLOP/s at 640-1,280 columns, 15 at 5,120): runs of rows are then cycled one after another
        per = max(1, self.MAX_COLUMNS // Nx)
        if rows <= per:
            da = self._body(x, rows, Nx)
        else:
            da = torch.cat([self._body(x[:, r * Nx:min(r + per, rows) * Nx], min(per, rows - r), Nx)
                            for r in range(0, rows, per)], 1)
        zn = zeta.unsqueeze(1) if zeta_members is None else zeta_members
        if c.gate:  # rows 1.. of the body's output: the gains, (W, B * N * Nx)
            return (da[0].view(B, N, Nx) + gated(da[1:].view(c.gate, B, N, Nx).permute(1, 2, 0, 3), zn)
                    + self.gain * zn)
        return da.view(B, N, Nx) + self.gain * zn

    MAX_COLUMNS = 1024
    # The exact GELU of a contiguous float32 matrix goes to oneDNN on x86 CPUs, which costs a fixed ~7 us per call
    # (10 us for a 40 x 40 matrix, against 3 us for ATen's own kernel, which a transposed view takes; measured on
    # a 2-core AVX-512 Xeon, docs/results/filter_speed.md); past a few hundred columns oneDNN is the faster one.
    GELU_NATIVE_BELOW = 512

    def _activation(self, cols: int):
        """The activation as a function of an (C, cols) matrix (None for the linear variant)."""
        if self.cfg.kind == "linear":
            return None
        f = self.act.forward  # the layers' own activation (.forward: no hooks to run, a few us less per call)
        return (lambda h: f(h.t()).t()) if self.cfg.activation == "gelu" and cols < self.GELU_NATIVE_BELOW else f

    def _body(self, x: torch.Tensor, rows: int, Nx: int) -> torch.Tensor:
        """The convolutions on the input channels x (C_in, rows * Nx) -> (1, rows * Nx), or (1 + W, rows * Nx) with
        a gated gain of width W (the increment's row, then the gains')."""
        cols = rows * Nx
        idx = self._taps(rows, Nx, x.device)
        mats = self._matrices()
        act = self._activation(cols)
        w, b = mats[0]
        h = torch.addmm(b, w, x.index_select(1, idx).view(-1, cols))
        i, Nl = 1, self.cfg.Nl
        for _ in range(self.cfg.Nbl):
            r = h
            for l in range(Nl):
                w, b = mats[i]
                i += 1
                h = torch.addmm(b, w, h.index_select(1, idx).view(-1, cols))
                if act is not None and l < Nl - 1:
                    h = act(h)
            h = h.add_(r)
        w, b = mats[i]
        if act is not None:
            h = act(h)
        h = h.index_select(1, idx).view(-1, cols)
        if self.cfg.gate:
            wg, bg = mats[i + 1]
            return torch.cat([torch.addmm(b, w, h), torch.addmm(bg, wg, h)])
        return torch.addmm(b, w, h)


def build_net(cfg: NetConfig) -> AnalysisNet:
    return AnalysisNet(cfg)
