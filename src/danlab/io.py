"""Atomic file writes and the code version, shared by run folders and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

# system folders that are never a place for results (writing there fails late, or does harm)
SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


class OutputError(ValueError):
    """An output location that cannot be used (a file, a system folder, not writable); one line."""


def check_output_dir(path: str | Path, label: str = "--out") -> Path:
    """Refuse, before any computation, an output folder that cannot be written: an existing file, a path
    under /proc, /sys or /dev, or one whose nearest existing parent is not a folder this process can
    create files in (probed by creating and removing a temporary file). Creates nothing that stays."""
    p = Path(path).expanduser()
    a = Path(os.path.abspath(p))
    for root in SYSTEM_DIRS:
        if a == root or root in a.parents:
            raise OutputError(f"{label} {path}: {root} is a system folder, not a place for results")
    if a.exists() and not a.is_dir():
        raise OutputError(f"{label} {path}: exists and is not a folder")
    anc = a
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{label} {path}: {anc} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".danlab-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{label} {path}: cannot write in {anc} ({exc.strerror or exc})") from None
    return p


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
