"""The learned analysis a_theta: a residual 1-D CNN with circular padding, and its variants.

E^a = E^f + a_theta(E^f, zeta), zeta = H^T R^-1 (y - H x̄^f) in state space.

How members enter: the same network is applied to every member n (members are folded into the batch),
with four input channels per site: the member x_n, the ensemble mean x̄, the ensemble standard deviation
(zero for a single member) and zeta. The increment is therefore per member, the network is equivariant
under permutations of the members, and one set of weights serves every ensemble size Ne (Ne = 1
included). Being fully convolutional with circular padding, it also serves every Nx.

Variants: 'cnn' (the reference residual CNN), 'linear' (the same layers without activations: an affine
map of its inputs), 'simplified' (sees only zeta, not E^f).

The output for member n is g * zeta_n + CNN(...), with zeta_n = H^T R^-1 (y - H x_n) the member's own
innovation (zeta_n = zeta for a single state), a learnable scalar gain g initialised at `gain0`, and the
last convolution initialised at zero: at step 0 the analysis is a stable nudging of every member towards
the observations (so the untrained network does not let the trajectories diverge, nor the members drift
apart), and training learns the rest. The CNN itself sees zeta, from the ensemble mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
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
        cin = 1 if cfg.kind == "simplified" else 4
        self.inp = _conv(cin, cfg.Nf, cfg.kernel)
        self.blocks = nn.Sequential(*[_Block(cfg.Nf, cfg.Nl, cfg.kernel, act) for _ in range(cfg.Nbl)])
        self.act = act()
        self.out = _conv(cfg.Nf, 1, cfg.kernel)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = nn.Parameter(torch.tensor(float(cfg.gain0)))

    def features(self, E: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
        """Input channels (B*N, C, Nx)."""
        B, N, Nx = E.shape
        z = zeta.unsqueeze(1).expand(B, N, Nx)
        if self.cfg.kind == "simplified":
            return z.reshape(B * N, 1, Nx)
        c = self.cfg
        xb = E.mean(1, keepdim=True)
        sd = E.std(1, keepdim=True) if N > 1 else torch.zeros_like(xb)
        chans = [(E - c.shift) / c.scale, ((xb - c.shift) / c.scale).expand_as(E), (sd / c.scale).expand_as(E), z]
        return torch.stack(chans, 2).reshape(B * N, 4, Nx)

    def forward(self, E: torch.Tensor, zeta: torch.Tensor, zeta_members: torch.Tensor | None = None) -> torch.Tensor:
        if E.dim() != 3 or zeta.dim() != 2 or zeta.shape[0] != E.shape[0] or zeta.shape[-1] != E.shape[-1]:
            raise ValueError(f"a_theta expects E (B, N, Nx) and zeta (B, Nx); got {tuple(E.shape)} and {tuple(zeta.shape)}")
        if zeta_members is not None and zeta_members.shape != E.shape:
            raise ValueError(f"a_theta expects zeta_members of the shape of E {tuple(E.shape)}; got {tuple(zeta_members.shape)}")
        if not self.training and not torch.is_grad_enabled():
            return self.infer(E, zeta, zeta_members)
        B, N, Nx = E.shape
        h = self.blocks(self.inp(self.features(E, zeta)))
        da = self.out(self.act(h)).view(B, N, Nx)
        return da + self.gain * (zeta.unsqueeze(1) if zeta_members is None else zeta_members)

    # ---- inference --------------------------------------------------------------------------------
    # The same function as the layers above (equal to float round-off: the sums run in another order), for
    # evaluation (eval mode, no autograd), where a cycle of one small state costs per-call overhead, not
    # arithmetic: at Nx 40 the 27 convolutions do 17 MFLOP, and nn.Conv1d with circular padding spends
    # ~100 us per layer padding and dispatching. Here the activations live as one (C, rows * Nx) matrix
    # (rows = B * N), and each convolution is one gather of its k circular shifts, (C * k, rows * Nx) from a
    # cached index, and one matrix product with the weights viewed as (C_out, C_in * k): 2 calls per
    # layer, whatever B and N. Training keeps the layers (the same parameters, so the same saved weights).

    def _taps(self, rows: int, Nx: int, device) -> torch.Tensor:
        """Index (k * rows * Nx,): entry (j, r, i) is the column r * Nx + (i + j - k // 2) mod Nx."""
        key = (rows, Nx, str(device))
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
        parameters (so they follow in-place updates), rebuilt when a parameter's storage changes (.to())."""
        convs = self.__dict__.get("_convs")
        if convs is None:
            convs = self.__dict__["_convs"] = [self.inp, *(l for b in self.blocks for l in b.f[::2]), self.out]
        key = tuple(c.weight.data_ptr() for c in convs) + tuple(c.bias.data_ptr() for c in convs)
        cached = self.__dict__.get("_mats")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_mats"] = (key, [(c.weight.detach().view(c.weight.shape[0], -1),
                                                      c.bias.detach().unsqueeze(1)) for c in convs])
        return cached[1]

    def infer(self, E: torch.Tensor, zeta: torch.Tensor, zeta_members: torch.Tensor | None = None) -> torch.Tensor:
        """forward() without autograd, by gathers and matrix products (see above); E (B, N, Nx) -> (B, N, Nx)."""
        B, N, Nx = E.shape
        rows = B * N
        c = self.cfg
        if c.kind == "simplified":
            x = zeta.unsqueeze(0).unsqueeze(2).expand(1, B, N, Nx).reshape(1, rows * Nx)
        else:
            xb = E.mean(1, keepdim=True)
            sd = E.std(1, keepdim=True) if N > 1 else torch.zeros_like(xb)
            x = torch.stack([(E - c.shift) / c.scale, ((xb - c.shift) / c.scale).expand_as(E),
                             (sd / c.scale).expand_as(E), zeta.unsqueeze(1).expand(B, N, Nx)]).view(4, rows * Nx)
        # past ~1,000 columns the gathered (C * k, columns) matrix leaves the cache and the product slows down
        # (measured: 22 GFLOP/s at 640-1,280 columns, 15 at 5,120): runs of rows are then cycled one after another
        per = max(1, self.MAX_COLUMNS // Nx)
        if rows <= per:
            da = self._body(x, rows, Nx)
        else:
            da = torch.cat([self._body(x[:, r * Nx:min(r + per, rows) * Nx], min(per, rows - r), Nx)
                            for r in range(0, rows, per)], 1)
        return da.view(B, N, Nx) + self.gain * (zeta.unsqueeze(1) if zeta_members is None else zeta_members)

    MAX_COLUMNS = 1024

    def _body(self, x: torch.Tensor, rows: int, Nx: int) -> torch.Tensor:
        """The convolutions on the input channels x (C_in, rows * Nx) -> (1, rows * Nx)."""
        cols = rows * Nx
        idx = self._taps(rows, Nx, x.device)
        mats = iter(self._matrices())

        def conv(h):  # h (C_in, cols) -> (C_out, cols), with the next layer's weights
            w, b = next(mats)
            return torch.addmm(b, w, h.index_select(1, idx).view(w.shape[1], cols))

        h = conv(x)
        for block in self.blocks:
            r = h
            for i in range(0, len(block.f), 2):
                h = conv(h)
                if i + 1 < len(block.f):
                    h = block.f[i + 1].forward(h)  # .forward: no hooks to run, a few us less per call
            h = h.add_(r)
        return conv(self.act.forward(h))


def build_net(cfg: NetConfig) -> AnalysisNet:
    return AnalysisNet(cfg)
