"""Atomic file writes and the code version, shared by run folders and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def code_version() -> str:
    """The git commit of the code (with '+dirty' when the work tree differs); outside a git checkout (a copy of
    the tree on another machine) the environment variable DANLAB_CODE_VERSION, else 'unknown'."""
    here = Path(__file__).resolve().parent
    fallback = os.environ.get("DANLAB_CODE_VERSION", "unknown")
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback
