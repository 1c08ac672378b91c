"""A trained a_theta as a filter: E^a = E^f + a_theta(E^f, H^T R^-1 (y - H x̄^f)).

Network files: `<dir>/model.json` (format danlab-net/1: the network config, what it was trained on,
provenance) beside its safetensors tensor file. A training run folder holds its best network in
`<run>/best/`; `load_net` accepts either folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, ValidationError, model_validator

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


@dataclass(frozen=True)
class Recentred:
    """The carried state of a learned ensemble recentred on a control: the ensemble (B, N, Nx) and the control
    analysis (B, 1, Nx), the ensemble's mean."""

    E: torch.Tensor
    control: torch.Tensor


class Learned(Filter):
    """The learned analysis. `checkpoint`: a network folder or a training run folder.

    With `control` (an ensemble, N > 1), the ensemble is recentred at every cycle on a control state analysed by
    its own single-state network, as operational ensembles of data assimilations are recentred on the
    deterministic analysis: the control x^c is forecast and analysed alone, x^c_a = x^c_f + a_control(x^c_f,
    H^T R^-1 (y - H x^c_f)), and the members' analysis anomalies (of `checkpoint`'s network, with its perturbed
    observations) are moved onto it, E^a <- E^a - mean(E^a) + x^c_a. The mean is then the single-state network's
    trajectory (its accuracy, up to the float round-off of the mean), and the members carry the uncertainty.
    """

    method: Literal["learned"] = "learned"
    N: int = Field(1, ge=1, description="ensemble size Ne (1: a single state)")
    checkpoint: str | None = None
    perturb: float | None = Field(None, ge=0, description="each member's own innovation zeta_n is taken against "
                                  "observations perturbed by perturb × N(0, R), centred over the members, as in the "
                                  "stochastic EnKF (a source of spread for N > 1); null: the value `danlab calibrate` "
                                  "recorded in the sidecar for this N if any, else as the network was trained "
                                  "(train.perturb_obs in its sidecar)")
    control: str | None = Field(None, description="a single-state network folder: the ensemble is recentred at every "
                                "cycle on the control state that this network analyses (N > 1; see the class)")
    reflect: bool | None = Field(None, description="average the network over the reflection u_j -> -u_{-j} (its "
                                 "net.reflect, with the same weights; ks only): null: as the network was trained")
    _net: AnalysisNet | None = PrivateAttr(None)
    _control_net: AnalysisNet | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_control(self):
        if self.control is not None and self.N < 2:
            raise ValueError(f"filter.control recentres an ensemble on a control state: it needs N >= 2 (got N {self.N})")
        return self

    @classmethod
    def from_net(cls, net: AnalysisNet, N: int = 1, perturb: float = 0.0,
                 control: AnalysisNet | None = None) -> "Learned":
        """The filter of a network in memory; `control`: the network of the control state (see the class)."""
        if control is not None and N < 2:
            raise ValueError(f"a control recentres an ensemble: it needs N >= 2 (got N {N})")
        f = cls(N=N, perturb=perturb)
        f._net, f._control_net = net, control
        return f

    def prepare(self, model, observer, dtype, device) -> "Learned":
        if self._net is not None:
            return self
        if self.checkpoint is None:
            raise CheckpointError("filter.checkpoint: the learned filter needs a checkpoint folder")
        net, meta = _load_sized(self.checkpoint, model, self.reflect)
        perturb = self.perturb
        if perturb is None:
            where = str(resolve_net_dir(self.checkpoint))
            if self.control is not None and calibrated_perturb(meta, self.N, where):
                raise CheckpointError(f"{self.checkpoint}: its calibrated perturbation is that of the ensemble without "
                                      "a control; give filter.perturb for the recentred one (danlab calibrate "
                                      "--set filter.control=...)")
            perturb = default_perturb(meta, self.N, where)
        control = None
        if self.control is not None:
            control, cmeta = _load_sized(self.control, model)
            names = [m["trained_with"].get("model", {}).get("name") for m in (meta, cmeta)]
            if None not in names and names[0] != names[1]:
                raise CheckpointError(f"{self.control}: trained on the model {names[1]}, the ensemble's network "
                                      f"({self.checkpoint}) on {names[0]}: a control must analyse the same dynamics")
            control = control.to(device)
        f = type(self)(N=self.N, perturb=perturb, checkpoint=self.checkpoint, control=self.control, reflect=self.reflect)
        f._net, f._control_net = net.to(device), control
        return f

    def resolved(self) -> dict:
        """An ensemble's observation perturbation, the source of its spread (given, calibrated in the sidecar, or as
        trained: see `perturb`)."""
        given = {} if self.reflect is None else {"reflect": self.reflect}
        if self.N == 1:
            return given
        return given | {"perturb": float(self.perturb)} | ({} if self._control_net is None else
                                                           {"control": self.control or "a network in memory"})

    @property
    def net(self) -> AnalysisNet:
        if self._net is None:
            raise CheckpointError("learned filter used before prepare(): no network loaded")
        return self._net

    def start(self, E: torch.Tensor):
        return E if self._control_net is None else Recentred(E, E.mean(-2, keepdim=True))

    def step(self, carry, model, obs: Obs, rng: BatchRNG):
        if self._control_net is None:
            return super().step(carry, model, obs, rng)
        Ef, Ea = self.cycle(carry.E, model, obs, rng)
        xf = model(carry.control)
        xa = xf + _apply(self._control_net, xf, obs.HtRinv_innovation(xf[..., 0, :]), None, obs)
        Ea = Ea - Ea.mean(-2, keepdim=True) + xa
        return Recentred(Ea, xa), Ef, Ea, None, 0

    def restart(self, carry, bad: torch.Tensor, x: torch.Tensor):
        if self._control_net is None:
            return super().restart(carry, bad, x)
        return Recentred(super().restart(carry.E, bad, x), super().restart(carry.control, bad, x))

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        # Under evaluation (eval mode, no autograd) the network takes its inference path (AnalysisNet.infer);
        # states in the network's dtype (float32, as every evaluation of a network runs) cross no conversion.
        one = E.shape[-2] == 1
        zeta = obs.HtRinv_innovation(E[..., 0, :] if one else E.mean(-2))  # a single member is its own mean
        zeta_n = None  # each member's own innovation (= zeta for one), against perturbed observations if perturb > 0
        if not one:
            zeta_n = obs.HtRinv_innovation(E - self.perturb * obs.sigma * centred_normal(E, rng) if self.perturb else E)
        return E + _apply(self.net, E, zeta, zeta_n, obs)


def _load_sized(path: str, model, reflect: bool | None = None) -> tuple[AnalysisNet, dict]:
    """`load_net`, refusing a network whose kernel cannot wrap the model's states, or that averages over a symmetry
    the model does not have (net.reflect, or `reflect` where not None: the same weights, averaged or not)."""
    net, meta = load_net(path)
    try:
        if reflect is not None and reflect != net.cfg.reflect:  # the same layers and weights: only the flag changes
            try:
                net.cfg = NetConfig.model_validate(net.cfg.model_dump() | {"reflect": reflect})
            except ValidationError as exc:
                raise ValueError(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")) from None
        net.cfg.check_size(model.Nx)
        net.cfg.check_model(model)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return net, meta


def _apply(net: AnalysisNet, E: torch.Tensor, zeta: torch.Tensor, zeta_n: torch.Tensor | None, obs: Obs) -> torch.Tensor:
    """The increment a_theta(E, zeta) in E's dtype, from a network in its own (float32: no conversion); a network
    with net.precision_input also gets the observation precision diag(H^T R^-1 H) of each site."""
    dtype = next(net.parameters()).dtype
    prec = () if not net.cfg.precision_input else ((obs.mask * obs.Rinv).to(dtype),)
    if E.dtype == dtype:
        return net(E, zeta, zeta_n, *prec)
    return net(E.to(dtype), zeta.to(dtype), None if zeta_n is None else zeta_n.to(dtype), *prec).to(E.dtype)
