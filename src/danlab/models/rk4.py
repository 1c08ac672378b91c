"""The classical fourth-order Runge–Kutta step, shared by the models integrated with it (Lorenz 96, QG)."""

from __future__ import annotations

from typing import Callable

import torch


def rk4_step(f: Callable, x, dt: float):
    """x + dt/6 (k1 + 2 k2 + 2 k3 + k4) for the autonomous tendency f; differentiable, any shape and dtype (a torch
    tensor, or a NumPy array with a NumPy tendency)."""
    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)
