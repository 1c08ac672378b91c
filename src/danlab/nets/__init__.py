"""Architectures for the learned analysis increment a_theta.

`NetConfig.kind` chooses the network: the 1-D kinds of nets/cnn.py (periodic 1-D states) and "sphere"
(nets/sphere.py: a 2-D CNN on a latitude-longitude grid, for models/qg_sphere.py, which needs `nlat`).
"""

from typing import Literal, get_args

from pydantic import Field

from danlab.nets.cnn import AnalysisNet
from danlab.nets.cnn import NetConfig as _CNNConfig
from danlab.nets.sphere import SphereNet, check_sphere_size


class NetConfig(_CNNConfig):
    kind: Literal[(*get_args(_CNNConfig.model_fields["kind"].annotation), "sphere")] = "cnn"
    nlat: int | None = Field(None, ge=1, description="kind sphere: the latitudes of the state's grid (nlon = Nx / nlat)")

    def check_size(self, Nx: int) -> None:
        if self.kind == "sphere":
            check_sphere_size(self, Nx)
        else:
            super().check_size(Nx)


def build_net(cfg: NetConfig):
    return SphereNet(cfg) if cfg.kind == "sphere" else AnalysisNet(cfg)


__all__ = ["NetConfig", "AnalysisNet", "SphereNet", "build_net"]
