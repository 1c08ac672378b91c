"""Config plumbing and the shared sections (model, observations): pydantic models loaded from YAML, with `--set a.b=value` overrides.

A bad field is reported by name with what is allowed (`ConfigError`), never as a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator, model_validator

from danlab.models import KuramotoSivashinsky, Lorenz96
from danlab.models.qg_sphere import QGSphere
from danlab.models.sht import SHT
from danlab.observations import Observer


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field."""


def check_device(value: str) -> str:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:N' (N < the number of GPUs), 'mps'."""
    import torch
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError("unknown device (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("this machine has no usable CUDA GPU (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine (use cpu)")
    elif dev.type != "cpu":
        raise ValueError(f"device type {dev.type} is not supported (expected cpu, cuda, cuda:N or mps)")
    return value


class Strict(BaseModel):
    """Base of every config section: frozen, unknown keys refused, and every float finite (inf and nan
    are never a meaningful value of a knob: they would only surface later as a crash or a silent NaN)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    # keys renamed since earlier versions, old -> new: a config that still uses the old name is refused with the
    # new one (stored run folders and sidecars are upgraded on reading instead, see `upgrade_renamed`)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed(cls, data):
        if isinstance(data, dict):
            for old, new in cls.renamed.items():
                if old in data:
                    raise ValueError(f"`{old}` was renamed `{new}`")
        return data

    @field_validator("device", check_fields=False)
    @classmethod
    def _device(cls, value):
        """Any section's `device` (runs, training) must name a device this machine has."""
        return check_device(value) if isinstance(value, str) else value


class _ModelSection(Strict):
    """What every model section shares: an integration step `dt` and `substeps` of it per observation interval."""

    @property
    def Dt(self) -> float:
        """Time between two observations (substeps × dt; in days for QG)."""
        return self.dt * self.substeps


class Lorenz96Config(_ModelSection):
    """Lorenz 96 (`name: lorenz96`), integrated by RK4."""

    renamed: ClassVar[dict[str, str]] = {"steps": "substeps"}
    name: Literal["lorenz96"] = Field("lorenz96", description="the model (Lorenz 96, integrated by RK4)")
    Nx: int = Field(40, ge=4, description="number of state variables")
    F: float = Field(8.0, description="forcing")
    dt: float = Field(0.05, gt=0, description="integration step")
    substeps: int = Field(1, ge=1, description="RK4 steps per observation interval (Δt = substeps × dt)")

    def build(self) -> Lorenz96:
        return Lorenz96(Nx=self.Nx, F=self.F, dt=self.dt, substeps=self.substeps)


class KSConfig(_ModelSection):
    """Kuramoto–Sivashinsky (`name: ks`), pseudo-spectral, integrated by ETDRK4; the defaults are the standard setup
    (Kassam & Trefethen 2005; Bocquet et al. 2019): Nx 128, length 32π, dt 0.5, observed every 2 steps (Δt 1)."""

    name: Literal["ks"] = Field("ks", description="the model (Kuramoto–Sivashinsky, integrated by ETDRK4)")
    Nx: int = Field(128, ge=4, description="number of grid points (even: the real FFT's Nyquist mode)")
    length: float = Field(32 * math.pi, gt=0, description="length of the periodic domain")
    dt: float = Field(0.5, gt=0, description="ETDRK4 step")
    substeps: int = Field(2, ge=1, description="ETDRK4 steps per observation interval (Δt = substeps × dt)")

    @field_validator("Nx")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even (got {value})")
        return value

    def build(self) -> KuramotoSivashinsky:
        return KuramotoSivashinsky(Nx=self.Nx, length=self.length, dt=self.dt, substeps=self.substeps)


class QGConfig(_ModelSection):
    """Equivalent-barotropic quasi-geostrophic flow on the sphere (`name: qg`), spectral with triangular truncation
    T, RK4 (models/qg_sphere.py: the equations, units and default setup). The state is the streamfunction on the
    Gaussian grid, flattened latitude-major: Nx = nlat × nlon (2048 at T21), in 10⁷ m² s⁻¹; time in days."""

    name: Literal["qg"] = Field("qg", description="the model (single-layer QG on the sphere, spherical harmonics, RK4)")
    T: int = Field(21, ge=1, le=170, description="triangular truncation (T21-T42 intended; ≤ 170: the Legendre "
                   "recurrence stays within float64)")
    nlat: int | None = Field(None, ge=2, description="Gaussian latitudes (default: the smallest alias-free, "
                             "(3T+1)/2 rounded up to even)")
    nlon: int | None = Field(None, ge=4, description="longitudes (default: the smallest alias-free, 3T+1 rounded up "
                             "to even)")
    dt: float = Field(1 / 24, gt=0, description="RK4 step in days")
    substeps: int = Field(6, ge=1, description="RK4 steps per observation interval (Δt = substeps × dt)")
    deformation_radius: float | None = Field(2000.0, gt=0, description="L_R in km (null: infinite, barotropic)")
    drag: float = Field(0.02, ge=0, description="linear drag on the vorticity, per day")
    jet_relaxation: float = Field(1.0, ge=0, description="relaxation rate of the zonal-mean vorticity to the jets', per day")
    jet_speed: float = Field(80.0, description="speed of the forced jets, m/s")
    jet_latitude: float = Field(45.0, ge=0, le=90, description="latitude of the jets (both hemispheres), degrees")
    jet_width: float = Field(8.0, gt=0, description="e-folding half-width of the jets, degrees")
    orography: float = Field(0.2, description="height of the wavenumber-2 orography, a fraction of the layer depth")
    hyperdiffusion: float = Field(1.0, ge=0, description="hyperdiffusion rate at degree T, per day")
    hyperdiffusion_order: int = Field(4, ge=1, description="order p of the hyperdiffusion (∇²)^p")

    @field_validator("nlat", "nlon")
    @classmethod
    def _alias_free(cls, value, info):
        T = info.data.get("T")
        if value is None or T is None:
            return value
        least = (3 * T + 1) / 2 if info.field_name == "nlat" else 3 * T + 1
        if value < least:
            raise ValueError(f"must be >= {least:g} at T{T}, else the nonlinear term aliases (got {value})")
        if info.field_name == "nlon" and value % 2:
            raise ValueError(f"must be even (got {value})")
        return value

    @property
    def grid(self) -> tuple[int, int]:
        """(nlat, nlon), the defaults resolved."""
        nlat, nlon = SHT.alias_free(self.T)
        return self.nlat or nlat, self.nlon or nlon

    @property
    def Nx(self) -> int:
        nlat, nlon = self.grid
        return nlat * nlon

    def build(self) -> QGSphere:
        return QGSphere(**self.model_dump(exclude={"name"}))


# The dynamics, chosen by `model.name` (lorenz96 when absent). Each member has `Nx` (the state size), `Dt` (the
# time between observations) and `build()` (the model object).
MODELS = {"lorenz96": Lorenz96Config, "ks": KSConfig, "qg": QGConfig}


def _model_tag(value) -> str | None:
    return value.get("name", "lorenz96") if isinstance(value, dict) else getattr(value, "name", None)


ModelConfig = Annotated[Union[tuple(Annotated[c, Tag(n)] for n, c in MODELS.items())], Discriminator(_model_tag)]
MODEL_FIELD = Field(default_factory=Lorenz96Config, description="the dynamics M, chosen by `name`")


def model_config(data: dict):
    """A model section (a dict) validated into its config class."""
    return validate(TypeAdapter(ModelConfig), data)


class ObsConfig(Strict):
    kind: Literal["identity", "subset", "random"] = Field(
        "identity", description="which sites are observed: all, the fixed `sites`, or a fresh random subset every cycle")
    sigma: float = Field(1.0, gt=0, description="observation error std, R = sigma^2 I")
    sites: tuple[int, ...] | None = Field(None, description="kind subset: the observed sites (0-based)")
    count: int | None = Field(None, ge=1, description="kind random: the number of observed sites")
    fraction: float | None = Field(None, gt=0, le=1, description="kind random: the observed fraction of the sites")
    count_min: int | None = Field(None, ge=1, description="kind random: the count is drawn in [count_min, count_max]")
    count_max: int | None = Field(None, ge=1, description="kind random: the count is drawn in [count_min, count_max]")
    count_by: Literal["cycle", "experiment"] = Field(
        "cycle", description="kind random with count_min < count_max: the count is drawn afresh every cycle (cycle), or "
        "fixed per experiment (experiment: count_min + id mod (count_max - count_min + 1); in training the batch row), "
        "so that each level of sparsity is sustained, as an evaluation at a fixed fraction sustains it")

    def build(self, Nx: int) -> Observer:
        return Observer(Nx=Nx, **self.model_dump())


# discriminator tags that pydantic puts in error locations; dropped from the field names we print
FILTER_TAGS = frozenset({"enkf", "etkf", "enkf_n", "letkf", "ienkf", "ienks", "var3d", "var4d", "climatology", "learned"})


def _tags() -> frozenset:
    return FILTER_TAGS | frozenset(MODELS)


def _format_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _tags()))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if e["type"] == "union_tag_invalid":  # an unknown filter.method or model.name
        key = "name" if "_model_tag" in e["ctx"]["discriminator"] else e["ctx"]["discriminator"].strip("'")
        return f"{loc}.{key}: unknown {e['ctx']['tag']!r} (expected one of {e['ctx']['expected_tags']})"
    if "input" in e and not isinstance(e["input"], dict) and e["type"] not in {"missing"} and "(got " not in msg:
        return f"{loc or 'config'}: {msg} (got {e['input']!r})"
    return f"{loc or 'config'}: {msg}"


def parse_value(text: str, where: str | None = None):
    """An override's value as YAML (numbers, booleans, lists), e.g. `filter.N=40`; `where` names it in the error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where or repr(text)}: not a valid value ({first})") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.sub=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(value, f"--set {item}")
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (give a YAML file"
                          + (", or --resume for a training run folder)" if (path / "checkpoint.json").is_file() else ")"))
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); is it a YAML config?") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate(cls, data: dict):
    """`data` validated into `cls` (a config class or a TypeAdapter), or a one-line ConfigError."""
    try:
        return cls.validate_python(data) if isinstance(cls, TypeAdapter) else cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None,
                stored: bool = False):
    """Load a config of class `cls` from YAML (or a dict), apply overrides, validate. `stored`: the config was
    written by danlab (a run folder's config.yaml), so keys renamed since are upgraded rather than refused."""
    data = dict(data or {}) if path is None else read_yaml(path)
    return validate(cls, apply_overrides(upgrade_renamed(data) if stored else data, overrides or []))


# section.old -> new, for every key renamed since earlier versions
RENAMED = {"model.steps": "substeps", "train.steps": "max_steps", "train.Ne": "N"}


def upgrade_renamed(data):
    """A config dict written by an earlier version (a run's config.yaml, a sidecar's `trained_with`) with the
    renamed keys under their new names; anything else unchanged (and anything not a mapping returned as is)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for path, new in RENAMED.items():
        sec, old = path.split(".")
        section = out.get(sec)
        if isinstance(section, dict) and old in section and new not in section:
            section = dict(section)
            section[new] = section.pop(old)
            out[sec] = section
    return out


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)

