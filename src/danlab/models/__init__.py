"""Dynamical models M. Each is an object holding its parameters; state tensors have shape (..., Nx)."""

from danlab.models.ks import KuramotoSivashinsky
from danlab.models.lorenz96 import Lorenz96
from danlab.models.linear import LinearModel
from danlab.models.qg_sphere import QGSphere

__all__ = ["KuramotoSivashinsky", "Lorenz96", "LinearModel", "QGSphere"]
