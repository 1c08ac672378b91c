"""Twin experiments: truth trajectories and their observations, generated online for B experiments."""

from __future__ import annotations

import torch

from danlab.observations import Obs, Observer
from danlab.rng import BatchRNG


def check_stable(model, x: torch.Tensor, cycles: int = 10) -> None:
    """Refuse (ConfigError) a model whose truth is not finite after its spin-up, or blows up within a few more
    cycles (an unstable integration: a time step far too large for the forcing, e.g. model.dt=1e10)."""
    with torch.no_grad():
        probe = x
        for _ in range(cycles):
            probe = model(probe)
        bound = 1e6 * (1.0 + abs(float(getattr(model, "F", 0.0))))
        ok = bool(torch.isfinite(x).all()) and bool(torch.isfinite(probe).all()) and float(probe.abs().max()) < bound
    if not ok:
        from danlab.config import ConfigError
        raise ConfigError(f"model: the truth blows up ({model}): the integration is unstable, lower model.dt"
                          + (" (or model.F)" if hasattr(model, "F") else ""))


class TwinStream:
    """Truth x_k = M(x_{k-1}) from a seeded spin-up, and y_k = H_k(x_k) + e_k, one cycle per `step()`.

    ids: the experiment id of each batch row (see BatchRNG); None draws for the whole batch from one
    generator (training). Experiment b of seed s gives the same truth and observations whatever else is
    in the batch.
    """

    def __init__(self, model, observer: Observer, B: int, seed: int, ids: list[int] | None = None,
                 dtype=torch.float64, device="cpu", spinup_time: float = 50.0, start: dict | None = None):
        """start: a state_dict() of this same stream taken earlier (e.g. right after its spin-up), resumed instead
        of drawing and spinning up the truth again."""
        self.model, self.observer, self.B = model, observer, B
        self.truth_rng = BatchRNG(seed, "truth", B, ids)
        self.obs_rng = BatchRNG(seed, "obs", B, ids)
        if start is not None:
            self.load_state_dict(start)
            return
        x0 = self.truth_rng.randn(model.Nx, dtype=dtype, device=device)
        self.x = model.spinup(model.initial(x0), spinup_time)
        check_stable(model, self.x)
        self.k = 0

    def step(self) -> tuple[torch.Tensor, Obs]:
        """Advance the truth by one cycle and observe it."""
        with torch.no_grad():
            self.x = self.model(self.x)
        self.k += 1
        return self.x, self.observer.observe(self.x, self.obs_rng)

    def state_dict(self) -> dict:
        return {"x": self.x, "k": self.k, "truth_rng": self.truth_rng.get_state(), "obs_rng": self.obs_rng.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.x, self.k = d["x"], int(d["k"])
        self.truth_rng.set_state(d["truth_rng"])
        self.obs_rng.set_state(d["obs_rng"])
