"""a_theta on the sphere: a residual 2-D CNN on the Gaussian grid of models/qg_sphere.py.

The state (B, N, Nx) is the field on an nlat × nlon latitude-longitude grid flattened latitude-major (north to
south), as QGSphere's. Same inputs, head and initialisation as the 1-D network (nets/cnn.py): per member the
channels (x_n - shift)/scale, (x̄ - shift)/scale, std/scale and zeta = H^T R^-1 (y - H x̄), plus sin(latitude)
(the grid is not homogeneous in latitude: the spacing in longitude shrinks towards the poles, and the Coriolis
parameter changes sign); the output is g * zeta_n + CNN(...), the last convolution initialised at zero.

Geometry: each convolution sees the sphere, not a rectangle. Longitude is periodic (circular padding), and
across a pole the neighbours of the first rows are the same rows on the opposite meridian: the padding rows above
the north pole are rows 0, 1, ... (in reverse order) shifted by half a turn in longitude, and likewise at the
south pole. On a Gaussian grid (latitudes symmetric about the equator) this is exact for scalar fields. A kernel of
k × k points then covers every grid point's neighbourhood, the poles included, and the network is equivariant
under rotations of the sphere about its axis by multiples of the grid spacing (a test checks this).
"""

from __future__ import annotations

import torch
from torch import nn

from danlab.nets.cnn import ACTIVATIONS


def sphere_pad(h: torch.Tensor, p: int) -> torch.Tensor:
    """Pad (..., nlat, nlon) by p points on every side as the sphere continues: circular in longitude, across the
    poles to the opposite meridian (nlon even). Returns (..., nlat + 2p, nlon + 2p)."""
    if p == 0:
        return h
    nlon = h.shape[-1]
    half = nlon // 2
    north = torch.roll(h[..., :p, :].flip(-2), half, dims=-1)
    south = torch.roll(h[..., -p:, :].flip(-2), half, dims=-1)
    h = torch.cat([north, h, south], -2)
    return torch.cat([h[..., -p:], h, h[..., :p]], -1)


class SphereConv(nn.Conv2d):
    """A k × k convolution on the sphere (padding by `sphere_pad`)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k, padding=0)
        self.p = k // 2

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(sphere_pad(h, self.p))


class _Block(nn.Module):
    def __init__(self, Nf: int, Nl: int, k: int, act):
        super().__init__()
        layers = []
        for i in range(Nl):
            layers.append(SphereConv(Nf, Nf, k))
            if i < Nl - 1:
                layers.append(act())
        self.f = nn.Sequential(*layers)

    def forward(self, h):
        return h + self.f(h)


def gaussian_sin_latitudes(nlat: int) -> torch.Tensor:
    """sin(latitude) of the nlat Gaussian latitudes, north to south (the grid of QGSphere)."""
    from danlab.models.sht import gauss_legendre
    return torch.from_numpy(gauss_legendre(nlat)[0])


class SphereNet(nn.Module):
    """a_theta(E, zeta[, zeta_members]) on the sphere: E (B, N, Nx), zeta (B, Nx) -> increment (B, N, Nx), with
    Nx = nlat × nlon (nlat from the config, nlon = Nx / nlat, even)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        act = nn.Identity if cfg.kind == "linear" else ACTIVATIONS[cfg.activation]
        self.inp = SphereConv(5, cfg.Nf, cfg.kernel)
        self.blocks = nn.Sequential(*[_Block(cfg.Nf, cfg.Nl, cfg.kernel, act) for _ in range(cfg.Nbl)])
        self.act = act()
        self.out = SphereConv(cfg.Nf, 1, cfg.kernel)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = nn.Parameter(torch.tensor(float(cfg.gain0)))
        self.register_buffer("mu", gaussian_sin_latitudes(cfg.nlat).float(), persistent=False)

    def features(self, E: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
        """Input channels (B*N, 5, nlat, nlon)."""
        B, N, Nx = E.shape
        nlat, c = self.cfg.nlat, self.cfg
        xb = E.mean(1, keepdim=True)
        sd = E.std(1, keepdim=True) if N > 1 else torch.zeros_like(xb)
        z = zeta.unsqueeze(1).expand(B, N, Nx)
        lat = self.mu.to(E.dtype).view(nlat, 1).expand(nlat, Nx // nlat).reshape(1, 1, Nx).expand(B, N, Nx)
        chans = [(E - c.shift) / c.scale, ((xb - c.shift) / c.scale).expand_as(E), (sd / c.scale).expand_as(E), z, lat]
        return torch.stack(chans, 2).reshape(B * N, 5, nlat, Nx // nlat)

    def forward(self, E: torch.Tensor, zeta: torch.Tensor, zeta_members: torch.Tensor | None = None) -> torch.Tensor:
        if E.dim() != 3 or zeta.dim() != 2 or zeta.shape[0] != E.shape[0] or zeta.shape[-1] != E.shape[-1]:
            raise ValueError(f"a_theta expects E (B, N, Nx) and zeta (B, Nx); got {tuple(E.shape)} and {tuple(zeta.shape)}")
        if zeta_members is not None and zeta_members.shape != E.shape:
            raise ValueError(f"a_theta expects zeta_members of the shape of E {tuple(E.shape)}; got {tuple(zeta_members.shape)}")
        B, N, Nx = E.shape
        if Nx % self.cfg.nlat or (Nx // self.cfg.nlat) % 2:
            raise ValueError(f"the sphere network expects Nx = nlat × nlon with nlat = {self.cfg.nlat} and nlon even, got Nx = {Nx}")
        h = self.blocks(self.inp(self.features(E, zeta)))
        da = self.out(self.act(h)).reshape(B, N, Nx)
        return da + self.gain * (zeta.unsqueeze(1) if zeta_members is None else zeta_members)


def check_sphere_size(cfg, Nx: int) -> None:
    """Refuse a state that is not an nlat × nlon grid with nlon even, or a kernel wider than the grid."""
    if cfg.nlat is None:
        raise ValueError("net.nlat: the sphere network needs the number of grid latitudes (e.g. 32 at T21)")
    if Nx % cfg.nlat or (Nx // cfg.nlat) % 2:
        raise ValueError(f"net.nlat: model.Nx = {Nx} is not a grid of nlat = {cfg.nlat} latitudes × an even number of "
                         f"longitudes")
    if cfg.kernel // 2 > min(cfg.nlat, Nx // cfg.nlat):
        raise ValueError(f"net.kernel: a kernel of {cfg.kernel} is wider than the {cfg.nlat} x {Nx // cfg.nlat} grid")
