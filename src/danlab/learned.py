"""A trained a_theta as a filter: E^a = E^f + a_theta(E^f, H^T R^-1 (y - H x̄^f)).

Network files: `<dir>/model.json` (format danlab-net/1: the network config, what it was trained on,
provenance) beside its safetensors tensor file. A training run folder holds its best network in
`<run>/best/`; `load_net` accepts either folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, ValidationError

from danlab.checkpoint import CheckpointError, load_state_strict, read_checkpoint, write_checkpoint
from danlab.config import upgrade_renamed
from danlab.filters.base import Filter, centred_normal
from danlab.io import write_json
from danlab.nets import AnalysisNet, NetConfig, build_net
from danlab.observations import Obs
from danlab.rng import BatchRNG

NET_FORMAT = "danlab-net/1"


def save_net(directory: str | Path, net: AnalysisNet, meta: dict) -> Path:
    """Write the network's weights and a sidecar with its config and `meta` (provenance, scores)."""
    return write_checkpoint(directory, "model", net.state_dict(),
                            dict(meta, format=NET_FORMAT, net=net.cfg.model_dump(mode="json")))


def resolve_net_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    if (path / "best" / "model.json").is_file():
        return path / "best"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    raise CheckpointError(f"{path}: no network here (expected model.json or best/model.json)")


def load_net(path: str | Path) -> tuple[AnalysisNet, dict]:
    """The network stored in `path` (a network folder or a training run folder) and its sidecar."""
    directory = resolve_net_dir(path)
    tensors, meta = read_checkpoint(directory, "model", NET_FORMAT)
    try:
        cfg = NetConfig.model_validate(meta.get("net"))
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        loc = ".".join(["net", *(str(p) for p in e["loc"])])
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) and "(got " not in e["msg"] else ""
        raise CheckpointError(f"{directory}/model.json: invalid network config: {loc}: "
                              f"{e['msg'].removeprefix('Value error, ')}{got}") from None
    trained = meta["trained_with"] = upgrade_renamed(meta.get("trained_with", {}))
    bad = ([("trained_with", trained)] if not isinstance(trained, dict) else
           [(f"trained_with.{k}", trained[k]) for k in ("model", "observations", "train", "net")
            if k in trained and not isinstance(trained[k], dict)])
    if bad:
        raise CheckpointError(f"{directory}/model.json: {bad[0][0]} must be a mapping (got {bad[0][1]!r:.40})")
    net = build_net(cfg)
    load_state_strict(net, tensors, str(directory))
    net.eval()
    return net, meta


def write_calibration(directory: str | Path, record: dict) -> None:
    """Record in the sidecar of the network in `directory` the perturbation chosen by `danlab calibrate`
    (key `calibrated`), by an atomic rewrite of model.json; the tensors are not touched."""
    directory = resolve_net_dir(directory)
    _, meta = read_checkpoint(directory, "model", NET_FORMAT)  # a damaged checkpoint is refused, not rewritten
    write_json(directory / "model.json", dict(meta, calibrated=record))


def calibrated_perturb(meta: dict, N: int, where: str) -> float | None:
    """The perturbation `danlab calibrate` recorded in a sidecar for ensembles of N members (None if none)."""
    cal = meta.get("calibrated")
    if cal is None:
        return None
    p = cal.get("perturb") if isinstance(cal, dict) else None
    if not isinstance(cal, dict) or isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
        raise CheckpointError(f"{where}/model.json: calibrated must be a mapping with a finite perturb >= 0 "
                              f"(got {cal!r:.60})")
    return float(p) if cal.get("N") == N else None


def default_perturb(meta: dict, N: int, where: str) -> float:
    """A network's observation perturbation for ensembles of N members when none is given: the calibrated one
    (`danlab calibrate --write`) for this N if any, else the one it was trained with (0 for a single state)."""
    p = calibrated_perturb(meta, N, where)
    return p if p is not None else float(meta["trained_with"].get("train", {}).get("perturb_obs", 0.0))


class Learned(Filter):
    """The learned analysis. `checkpoint`: a network folder or a training run folder."""

    method: Literal["learned"] = "learned"
    N: int = Field(1, ge=1, description="ensemble size Ne (1: a single state)")
    checkpoint: str | None = None
    perturb: float | None = Field(None, ge=0, description="each member's own innovation zeta_n is taken against "
                                  "observations perturbed by perturb × N(0, R), centred over the members, as in the "
                                  "stochastic EnKF (a source of spread for N > 1); null: the value `danlab calibrate` "
                                  "recorded in the sidecar for this N if any, else as the network was trained "
                                  "(train.perturb_obs in its sidecar)")
    _net: AnalysisNet | None = PrivateAttr(None)

    @classmethod
    def from_net(cls, net: AnalysisNet, N: int = 1, perturb: float = 0.0) -> "Learned":
        f = cls(N=N, perturb=perturb)
        f._net = net
        return f

    def prepare(self, model, observer, dtype, device) -> "Learned":
        if self._net is not None:
            return self
        if self.checkpoint is None:
            raise CheckpointError("filter.checkpoint: the learned filter needs a checkpoint folder")
        net, meta = load_net(self.checkpoint)
        try:
            net.cfg.check_size(model.Nx)
        except ValueError as exc:
            raise CheckpointError(f"{self.checkpoint}: {exc}") from None
        perturb = self.perturb
        if perturb is None:
            perturb = default_perturb(meta, self.N, str(resolve_net_dir(self.checkpoint)))
        return type(self).from_net(net.to(device), self.N, perturb)

    def resolved(self) -> dict:
        """An ensemble's observation perturbation, the source of its spread (given, calibrated in the sidecar, or as
        trained: see `perturb`)."""
        return {"perturb": float(self.perturb)} if self.N > 1 else {}

    @property
    def net(self) -> AnalysisNet:
        if self._net is None:
            raise CheckpointError("learned filter used before prepare(): no network loaded")
        return self._net

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        # Under evaluation (eval mode, no autograd) the network takes its inference path (AnalysisNet.infer);
        # states in the network's dtype (float32, as every evaluation of a network runs) cross no conversion.
        one = E.shape[-2] == 1
        zeta = obs.HtRinv_innovation(E[..., 0, :] if one else E.mean(-2))  # a single member is its own mean
        zeta_n = None  # each member's own innovation (= zeta for one), against perturbed observations if perturb > 0
        if not one:
            zeta_n = obs.HtRinv_innovation(E - self.perturb * obs.sigma * centred_normal(E, rng) if self.perturb else E)
        dtype = next(self.net.parameters()).dtype
        if E.dtype == dtype:
            return E + self.net(E, zeta, zeta_n)
        dE = self.net(E.to(dtype), zeta.to(dtype), None if zeta_n is None else zeta_n.to(dtype))
        return E + dE.to(E.dtype)
