"""Helpers shared by the benchmarks: the command line that made a result, and a Markdown table writer."""

from __future__ import annotations

import platform
import shlex
import sys
import time

import torch

from danlab.io import code_version


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def provenance() -> str:
    return (f"code {code_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def merge_rows(old: list[dict], new: list[dict], order: list[str]) -> list[dict]:
    """The rows of both tables, those of `new` replacing those of `old` for the same method, in `order`."""
    new, old = {r["method"]: r for r in new}, {r["method"]: r for r in old}
    return [new.get(m) or old[m] for m in order if m in new or m in old]
