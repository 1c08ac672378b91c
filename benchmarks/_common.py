"""Helpers shared by the benchmarks: the command line that made a result, a Markdown table writer, and the
tuned-then-scored table of classical baselines (tuned on seed 1, scored on seed 0) used for each model."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from danlab.io import code_version


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows: speed figures mean nothing without it."""
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance() -> str:
    return (f"code {code_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)")


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def merge_rows(old: list[dict], new: list[dict], order: list[str]) -> list[dict]:
    """The rows of both tables, those of `new` replacing those of `old` for the same method, in `order`."""
    new, old = {r["method"]: r for r in new}, {r["method"]: r for r in old}
    return [new.get(m) or old[m] for m in order if m in new or m in old]


TABLE_PROTOCOL = ("aRMSE: mean over the scored experiments (seed 0) of the time mean of the analysis RMSE after the "
                  "burn-in (column *scored*: experiments × scored cycles); the 95% interval is corrected for "
                  "autocorrelation. Hyperparameters tuned on seed 1 (column *tuned*: the best value and the grid; the "
                  "budget in the JSON, key `tuning`), one batched run per grid; a best value on the edge of its grid "
                  "is marked *edge*. ")


def score_methods(methods: list[tuple], cfg_dir: Path, a, *, cycles: int, exps: int, burn: int, tune_cycles: int,
                  tune_burn: int, tune_exps: int, extra=None) -> list[dict]:
    """One row per method (name, config file in cfg_dir, overrides, tuning grids, published score) whose name
    matches `a.only` (texts separated by |): its grids tuned by one batched run on seed 1 (or the values read
    from `a.tuned_from`, an earlier table's JSON), then scored on seed 0 with the best values. A smoother's row
    also has its smoothed aRMSE (armse_s). extra(file, overrides with the tuned values): more columns for the row
    (e.g. speed runs)."""
    from danlab.config import load_config
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import parse_grid, run_experiment, tune_on_seed

    rows = []
    for name, file, over, grids, target in methods:
        if a.only and not any(t in name for t in a.only.split("|")):
            continue
        base = [f"threads={a.threads}"] + over
        best, t0 = {}, time.perf_counter()
        if grids and a.tuned_from:  # the values tuned (on seed 1) by an earlier run
            prev = {r["method"]: r for r in json.loads(Path(a.tuned_from).read_text())}[name]
            best = {f"filter.{kv.split('=')[0]}": json.loads(kv.split("=")[1]) for kv in prev["tuned"].split(", ")}
            print(f"  {name}: tuned values {best} from {a.tuned_from}", flush=True)
        elif grids:
            best, res = tune_on_seed(cfg_dir / file, base, grids, cycles=tune_cycles, burn_in=tune_burn, batch=tune_exps,
                                     seed=1)
            print(f"  tuned {name}: best {best} (aRMSE {res['armse']:.4f} on tuning seeds, {time.perf_counter() - t0:.0f} s)",
                  flush=True)
        fixed = base + [f"{k}={v}" for k, v in best.items()]
        cfg = load_config(RunConfig, cfg_dir / file, fixed + [f"cycles={cycles}", f"burn_in={burn}", f"batch={exps}", "seed=0"])
        acc = run_experiment(cfg, None)
        edge = [k.split(".")[-1] for k, v in best.items() for g, vals in map(parse_grid, grids)
                if g == k and v in (vals[0], vals[-1])]
        row = {"method": name, "tuned": ", ".join(f"{k.split('.')[-1]}={v}" for k, v in best.items()) or "—",
               "edge": ", ".join(edge),
               "grids": "; ".join(grids) or "—", "armse": acc["armse"], "armse_ci": acc["armse_ci"],
               "spread": acc["spread"], "scored_cycles": (cycles - burn) * exps, "diverged": acc["n_diverged"],
               **{k: acc[k] for k in ("spread_ratio", "rank_hist") if k in acc},
               **({"armse_s": acc["armse_s"], "armse_s_ci": acc["armse_s_ci"]} if "armse_s" in acc else {}),
               "target": target, "exp_cycles_per_s": acc["experiment_cycles_per_s"],
               "tuning": (prev["tuning"] if a.tuned_from else f"seed 1, {tune_exps} × {tune_cycles} cycles") if grids else "—",
               "scored": f"{exps} × {cycles - burn} after {burn}", "command": command_line(), "code": provenance()}
        row |= extra(file, fixed) if extra else {}
        rows.append(row)
        print(f"{name}: aRMSE {row['armse']:.4f} ± {row['armse_ci']:.4f} [{row['tuned']}] "
              f"{row['exp_cycles_per_s']:.0f} experiment-cycles/s", flush=True)
    return rows


def baseline_table(rows: list[dict], out: Path, stem: str, intro: str, note: str = "") -> None:
    """{stem}.json and {stem}.md from the rows of score_methods, after `intro`; each row says the command and
    code that made it."""
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    commands = list(dict.fromkeys(r["command"] for r in rows))
    table = markdown_table(
        ["method", "tuned (grid)", "aRMSE ± 95% CI", "published", "spread", "scored", "diverged",
         "experiment-cycles/s", "made by"],
        [[r["method"], f"{r['tuned']} ({r['grids']})" + (f" *edge: {r['edge']}*" if r.get("edge") else ""),
          f"{r['armse']:.3f} ± {r['armse_ci']:.3f}", r["target"], f"{r['spread']:.3f}", r["scored"], r["diverged"],
          f"{r['exp_cycles_per_s']:.0f}", f"({commands.index(r['command']) + 1})"] for r in rows])
    text = (intro + table + "\nMade by:\n\n"
            + "".join(f"{i + 1}. `{c}` ({next(r['code'] for r in rows if r['command'] == c)})\n"
                      for i, c in enumerate(commands))
            + (f"\n{note}\n" if note else ""))
    (out / f"{stem}.md").write_text(text)
    print(text)
