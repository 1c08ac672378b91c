"""The config of a twin experiment run (`danlab run`, `danlab tune`)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import Field, model_validator

from danlab.config import MODEL_FIELD, ModelConfig, ObsConfig, Strict
from danlab.filters.ensemble import EnKF, EnKF_N, ETKF
from danlab.filters.iterative import IEnKF, IEnKS
from danlab.filters.local import LETKF
from danlab.filters.variational import Climatology, Var3D, Var4D
from danlab.learned import Learned

FilterConfig = Annotated[Union[EnKF, ETKF, EnKF_N, LETKF, IEnKF, IEnKS, Var3D, Var4D, Climatology, Learned], Field(discriminator="method")]


class RunConfig(Strict):
    """A twin experiment: `batch` independent experiments of `cycles` cycles each."""

    seed: int = Field(0, description="seed of the truth, observations, initial ensembles and filter draws")
    cycles: int = Field(10_000, ge=2, description="DA cycles of each experiment")
    burn_in: int = Field(500, ge=0, description="first cycles not scored (must be < cycles)")
    batch: int = Field(1, ge=1, description="independent experiments run at once")
    dtype: Literal["float64", "float32"] = Field("float64", description="floating-point precision of the states")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N (refused when this machine lacks it)")
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch (default: 1 for small problems, "
                                "where more threads only cost, above all beside other busy processes; else all cores)")
    init_std: float = Field(1.0, ge=0, description="std of the initial ensemble around the truth")
    divergence_factor: float = Field(1.2, gt=0, description="flag a run whose analysis RMSE exceeds this times the truth's climatological spread (a lost filter sits near 1.4)")
    model: ModelConfig = MODEL_FIELD
    observations: ObsConfig = ObsConfig()
    filter: FilterConfig = Field(default_factory=lambda: EnKF_N(method="enkf_n"))

    @model_validator(mode="after")
    def _check(self):
        if self.burn_in >= self.cycles:
            raise ValueError(f"burn_in must be < cycles (got burn_in={self.burn_in}, cycles={self.cycles})")
        self.observations.build(self.model.Nx)  # raises on sites/counts outside the grid
        lag = getattr(self.filter, "lag", 1)
        if lag > self.cycles - self.burn_in - 1:  # else no smoothed cycle would be scored
            raise ValueError(f"filter.lag must be < cycles - burn_in = {self.cycles - self.burn_in} "
                             f"(a window of {lag} cycles is longer than the scored run)")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)




def resized_model(model: dict, Nx: int) -> dict:
    """The model section `model` at the state size Nx with the same grid spacing: a domain with a length
    (Kuramoto–Sivashinsky) grows with Nx, so that a network trained at one size sees the resolution it was trained at
    (the transdimensional transfer); Lorenz 96 has no length, its sites are its grid."""
    out = dict(model) | {"Nx": Nx}
    if "length" in model and model.get("Nx"):
        out["length"] = model["length"] * Nx / model["Nx"]
    return out


def learned_eval_data(trained: dict, checkpoint: str, *, seed: int = 0, cycles: int = 10_000, burn_in: int = 500,
                      batch: int = 8, Nx: int | None = None, N: int | None = None) -> dict:
    """The RunConfig data that evaluates a trained network as a filter on the twin it was trained on
    (model and observations of its training config `trained`), on held-out trajectories, in float32 (the
    network's precision). Every evaluation of a network (eval, export, reproduce, sweeps) is built here."""
    model = dict(trained.get("model", {}))
    if Nx is not None:  # 0 or a negative size is refused by the validation, not taken for "the default"
        model = resized_model(model, Nx)
    return {"seed": seed, "cycles": cycles, "burn_in": min(burn_in, cycles - 1), "batch": batch, "dtype": "float32",
            "model": model, "observations": dict(trained.get("observations", {})),
            "filter": {"method": "learned", "checkpoint": str(checkpoint), "N": N if N is not None else trained.get("train", {}).get("N", 1)}}
