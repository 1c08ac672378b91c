"""Config plumbing and the shared sections (model, observations): pydantic models loaded from YAML, with `--set a.b=value` overrides.

A bad field is reported by name with what is allowed (`ConfigError`), never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from danlab.models import Lorenz96
from danlab.observations import Observer


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field."""


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Strict):
    name: Literal["lorenz96"] = "lorenz96"
    Nx: int = Field(40, ge=4, description="number of state variables")
    F: float = 8.0
    dt: float = Field(0.05, gt=0, description="integration step")
    steps: int = Field(1, ge=1, description="integration steps per observation interval")

    def build(self) -> Lorenz96:
        return Lorenz96(Nx=self.Nx, F=self.F, dt=self.dt, steps=self.steps)


class ObsConfig(Strict):
    kind: Literal["identity", "subset", "random"] = "identity"
    sigma: float = Field(1.0, gt=0, description="observation error std, R = sigma^2 I")
    sites: tuple[int, ...] | None = None
    count: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    count_min: int | None = Field(None, ge=1)
    count_max: int | None = Field(None, ge=1)

    def build(self, Nx: int) -> Observer:
        return Observer(Nx=Nx, **self.model_dump())


# discriminator tags that pydantic puts in error locations; dropped from the field names we print
FILTER_TAGS = frozenset({"enkf", "etkf", "enkf_n", "ienkf", "var3d", "learned"})


def _format_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in FILTER_TAGS))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if "input" in e and not isinstance(e["input"], dict) and e["type"] not in {"missing"}:
        return f"{loc or 'config'}: {msg} (got {e['input']!r})"
    return f"{loc or 'config'}: {msg}"


def parse_value(text: str):
    """An override's value as YAML (numbers, booleans, lists), e.g. `filter.N=40`."""
    return yaml.safe_load(text)


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
        node[parts[-1]] = parse_value(value)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Load a config of class `cls` from YAML (or a dict), apply overrides, validate."""
    data = dict(data or {}) if path is None else read_yaml(path)
    return validate(cls, apply_overrides(data, overrides or []))


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)

