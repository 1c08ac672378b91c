"""`danlab config show [CONFIG]`: every config key with its type, default and description, read from the
pydantic models themselves (so the listing cannot drift from what the validation accepts); with a CONFIG,
the value each key takes there too."""

from __future__ import annotations

import types
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from danlab.config import ConfigError, load_config, read_yaml


def _type_name(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (list, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Annotated:
        return _type_name(args[0])
    return getattr(ann, "__name__", str(ann)).replace("NoneType", "null")


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for cls, sym in ((Ge, ">="), (Gt, ">"), (Le, "<="), (Lt, "<")):
            if isinstance(m, cls):
                out.append(f"{sym} {getattr(m, next(iter(m.__dataclass_fields__)))}")
        if isinstance(m, MaxLen):
            out.append(f"at most {m.max_length} long")
    return ", ".join(out)


def _default(field):
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        try:
            v = field.default_factory()
        except TypeError:
            return "—"
        return v.method if isinstance(v, BaseModel) and hasattr(v, "method") else v
    return "required"


def _fmt(v) -> str:
    if isinstance(v, BaseModel):
        return "…"
    if isinstance(v, tuple):
        v = list(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _filter_classes(ann) -> list[type[BaseModel]]:
    """The classes of a discriminated union annotation (the filter by `method`, the model by `name`)."""
    unwrap = lambda a: typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a  # noqa: E731
    return [a for a in map(unwrap, typing.get_args(unwrap(ann))) if isinstance(a, type) and issubclass(a, BaseModel)]


def describe(cls: type[BaseModel], prefix: str = "", instance: BaseModel | None = None) -> list[dict]:
    """One row per leaf key: key, type, default, description (and value when `instance` is given)."""
    rows = []
    for name, field in cls.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        ann = field.annotation
        value = getattr(instance, name) if instance is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, f"{key}.", value)
            continue
        classes = _filter_classes(ann)
        if classes:  # the filter or the model: one block per method (name), or the one in use
            for fc in ([type(value)] if value is not None else classes):
                tag = "method" if "method" in fc.model_fields else "name"
                which = fc.model_fields[tag].default
                sub = describe(fc, f"{key}.", value)
                for r in sub:
                    if value is None and len(classes) > 1:
                        r["description"] = f"[{tag} {which}] {r['description']}".rstrip()
                rows += sub
            continue
        bounds = _bounds(field)
        row = {"key": key, "type": _type_name(ann) + (f" ({bounds})" if bounds else ""),
               "default": _fmt(_default(field)), "description": field.description or ""}
        if instance is not None:
            row["value"] = _fmt(value)
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict]) -> str:
    cols = ["key", "type", "default"] + (["value"] if rows and "value" in rows[0] else []) + ["description"]
    width = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols[:-1]}
    lines = [title, "  ".join(c.ljust(width[c]) if c in width else c for c in cols)]
    for r in rows:
        lines.append("  ".join(r[c].ljust(width[c]) if c in width else r[c] for c in cols).rstrip())
    return "\n".join(lines)


def _classes():
    from danlab.experiments.run_config import RunConfig
    from danlab.training.train_config import TrainRunConfig
    return {"run": ("run config (danlab run, tune; eval with --set)", RunConfig),
            "train": ("training config (danlab train)", TrainRunConfig)}


def show(path: str | Path | None = None, overrides: list[str] | None = None, kind: str | None = None) -> str:
    classes = _classes()
    if path is None:
        if overrides:
            raise ConfigError("config show: --set needs a CONFIG")
        kinds = [kind] if kind else ["run", "train"]
        return "\n\n".join(_table(f"# {classes[k][0]}", describe(classes[k][1])) for k in kinds)
    if kind is None:
        data = read_yaml(path)
        kind = "train" if {"net", "train"} & set(data) else "run"
    title, cls = classes[kind]
    cfg = load_config(cls, path, overrides or [])
    return _table(f"# {path}: {title}", describe(cls, instance=cfg))
