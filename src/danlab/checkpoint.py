"""Checkpoints: tensors in safetensors (never pickle), everything else in a JSON sidecar.

`<dir>/<name>.json` is the sidecar; it names its tensor file `<name>-<digest>.safetensors` and holds that
file's SHA-256. Both are written atomically (temporary file + rename), the tensor file first and the
sidecar last, so a job killed mid-write leaves the previous checkpoint intact. Loading checks the format
tag, the digest and the tensors' names and shapes, and refuses anything else with one clear line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from danlab.io import atomic_write_text, code_version, write_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, truncated, mismatched)."""


def write_checkpoint(directory: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = directory / f".{name}.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    fname = f"{name}-{digest[:12]}.safetensors"
    os.replace(tmp, directory / fname)
    meta = dict(meta, tensors=fname, sha256=digest)
    write_json(directory / f"{name}.json", meta)
    for old in directory.glob(f"{name}-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)
    return directory / f"{name}.json"


def read_checkpoint(directory: str | Path, name: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    side = directory / f"{name}.json"
    if not side.is_file():
        raise CheckpointError(f"{side}: no checkpoint here (missing sidecar)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: corrupt sidecar, not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{side}: not a {fmt} checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    fname = meta.get("tensors")
    if not isinstance(fname, str) or "/" in fname or not (directory / fname).is_file():
        raise CheckpointError(f"{side}: its tensor file {fname!r} is missing")
    data = (directory / fname).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{directory / fname}: corrupt or truncated (SHA-256 differs from the sidecar's)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / fname}: unreadable safetensors file ({exc})") from None
    return tensors, meta


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict, refusing missing, unexpected or mis-shaped tensors with one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where}: does not match the network (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the network needs {tuple(v.shape)}")
    module.load_state_dict(state)


__all__ = ["CheckpointError", "write_checkpoint", "read_checkpoint", "load_state_strict",
           "atomic_write_text", "write_json", "code_version"]
