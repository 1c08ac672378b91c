"""Run a twin experiment or a tuning grid from a RunConfig, and write its run folder.

A run folder holds: config.yaml (resolved), stats.nc (per-cycle statistics, xarray), summary.json and
rmse.png. A tuning folder holds config.yaml, tune.nc, tune.csv, summary.json and tune.png.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from danlab.config import ConfigError, apply_overrides, load_config, parse_value, to_yaml, validate
from danlab.cycle import CycleResult, run_cycles
from danlab.experiments.run_config import RunConfig
from danlab.io import atomic_write_text, check_output_dir, write_json
from danlab.resources import check_run_memory, default_threads
from danlab.twin import TwinStream


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def simulate(cfg: RunConfig, filt=None, rows_per_experiment: int = 1, progress: bool = False) -> CycleResult:
    """Cycle cfg.filter (or `filt`, which may carry (B,) tensor hyperparameters) on cfg's twin experiment.

    rows_per_experiment > 1 repeats each of the cfg.batch experiments that many times (for a grid whose
    points share truth and observations); the batch is then grid-major: row = point * batch + b.
    """
    check_run_memory(cfg, rows_per_experiment)
    set_threads(cfg.threads or default_threads(cfg, rows_per_experiment))
    model = cfg.model.build()
    observer = cfg.observations.build(cfg.model.Nx)
    try:  # what the config cannot see: e.g. a 4D-Var on a model that autograd cannot differentiate
        filt = (filt or cfg.filter).prepare(model, observer, cfg.torch_dtype, cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ids = [b for _ in range(rows_per_experiment) for b in range(cfg.batch)]
    twin = TwinStream(model, observer, len(ids), cfg.seed, ids=ids, dtype=cfg.torch_dtype, device=cfg.device)
    res = run_cycles(filt, model, twin, cfg.cycles, cfg.burn_in, cfg.seed, ids=ids, init_std=cfg.init_std,
                     divergence_factor=cfg.divergence_factor, progress=progress)
    res.extra["resolved"] = filt.resolved()
    return res


def summarize(cfg: RunConfig, res: CycleResult, rows=None) -> dict:
    s = res.scores(rows)
    return {"method": cfg.filter.method, "N": cfg.filter.N, "Nx": cfg.model.Nx, **s, "cycles": cfg.cycles,
            "burn_in": cfg.burn_in, "cycles_per_s": cfg.cycles / res.wall_s,
            "experiment_cycles_per_s": res.B * cfg.cycles / res.wall_s, "wall_s": res.wall_s,
            "threads": torch.get_num_threads(), **res.extra.get("resolved", {})}


def stats_dataset(res: CycleResult, cfg: RunConfig) -> xr.Dataset:
    dims = ("experiment", "cycle")
    ds = xr.Dataset(
        {"rmse_f": (dims, res.rmse_f), "rmse_a": (dims, res.rmse_a), "spread_f": (dims, res.spread_f),
         "spread_a": (dims, res.spread_a), "diverged": ("experiment", res.diverged.astype(np.int8)),
         "diverged_at": ("experiment", res.diverged_at)},
        coords={"experiment": np.arange(res.B), "cycle": np.arange(1, res.cycles + 1)},
        attrs={"method": cfg.filter.method, "burn_in": cfg.burn_in, "config": to_yaml(cfg)})
    ds["rmse_a"].attrs["long_name"] = "spatial RMSE of the analysis mean against the truth"
    if "unconverged" in res.extra:
        ds["unconverged"] = ("experiment", res.extra["unconverged"])
        ds["unconverged"].attrs["long_name"] = "analyses whose iterations stopped at max_iter unconverged"
    if res.rmse_s is not None:
        ds["rmse_s"] = (dims, res.rmse_s)
        ds["rmse_s"].attrs["long_name"] = (f"spatial RMSE of the smoothed mean (lag {cfg.filter.lag}: after the "
                                           "observations up to lag cycles later) against the truth")
    ds["rmse_f"].attrs["long_name"] = "spatial RMSE of the forecast mean against the truth"
    ds["spread_a"].attrs["long_name"] = "sqrt of the site-mean analysis ensemble variance"
    if res.rank_hist is not None:
        ds["rank_hist"] = (("experiment", "rank"), res.rank_hist)
        ds["rank_hist"].attrs["long_name"] = ("rank of the truth among the analysis members (members below it), counted "
                                              "over the scored cycles and every site")
        ds = ds.assign_coords(rank=np.arange(res.rank_hist.shape[1]))
    return ds


def write_netcdf(ds: xr.Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_netcdf(tmp)
    tmp.replace(path)


def plot_rmse(res: CycleResult, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    k = np.arange(1, res.cycles + 1)
    with warnings.catch_warnings():  # cycles where every experiment has diverged are all-NaN: not drawn
        warnings.simplefilter("ignore", RuntimeWarning)
        ax.plot(k, np.nanmean(res.rmse_a, 0), lw=0.8, label="analysis RMSE")
        ax.plot(k, np.nanmean(res.rmse_f, 0), lw=0.6, alpha=0.7, label="forecast RMSE")
        if np.nanmax(np.nan_to_num(res.spread_a)) > 0:
            ax.plot(k, np.nanmean(res.spread_a, 0), lw=0.6, alpha=0.7, label="analysis spread")
    ax.axvline(res.burn_in, color="k", lw=0.5, ls=":")
    if (np.nan_to_num(res.rmse_a, nan=0.0) > 0).any():  # nothing to draw when every experiment diverged at once
        ax.set_yscale("log")
    ax.set_xlabel("cycle")
    ax.set_ylabel("RMSE (mean over the scored experiments)")
    ok = res.B - int(res.diverged.sum())
    ax.set_title(f"{summary['method']}: aRMSE {format_score(summary)}"
                 f" ({ok} of {res.B} experiment{'s' if res.B > 1 else ''} scored"
                 + (f", {res.B - ok} diverged)" if ok < res.B else ")"), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_score(s: dict, digits: int = 4, partial: bool = False) -> str:
    """A summary's aRMSE for people: "0.1900 ± 0.0020", "diverged (k of n)" when no experiment was scored.
    partial: the score of the surviving experiments is followed by "(k of n diverged)" when k of the n were lost (a
    table's cell; a summary line says it in its own words)."""
    armse, ci = s.get("armse", math.nan), s.get("armse_ci", math.nan)
    n = s.get("experiments")
    k = s.get("n_diverged")
    if armse is not None and math.isfinite(armse):
        lost = f" ({int(k)} of {int(n)} diverged)" if partial and k and n else ""
        return f"{armse:.{digits}f} ± {ci:.{digits}f}{lost}"
    if k and n:
        return f"diverged ({k} of {n})"
    return "diverged" if s.get("diverged") else "—"


def run_experiment(cfg: RunConfig, out: str | Path | None, progress: bool = False) -> dict:
    if out is not None:
        check_output_dir(out)
    check_run_memory(cfg)
    res = simulate(cfg, progress=progress)
    summary = summarize(cfg, res)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
        write_netcdf(stats_dataset(res, cfg), out / "stats.nc")
        plot_rmse(res, summary, out / "rmse.png")
        summary["out"] = str(out)
        write_json(out / "summary.json", summary)
    return summary


# ---- tuning ---------------------------------------------------------------------------------------

def parse_grid(spec: str) -> tuple[str, list]:
    """`NAME=start:stop:step` (stop included) or `NAME=v1,v2,...`; a bare NAME means filter.NAME."""
    if "=" not in spec:
        raise ConfigError(f"--grid {spec}: expected NAME=start:stop:step or NAME=v1,v2,...")
    name, rhs = (s.strip() for s in spec.split("=", 1))
    if "." not in name:
        name = f"filter.{name}"
    if ":" in rhs:
        try:
            start, stop, step = (float(v) for v in rhs.split(":"))
        except ValueError:
            raise ConfigError(f"--grid {spec}: start:stop:step must be three numbers") from None
        if not all(math.isfinite(v) for v in (start, stop, step)):
            raise ConfigError(f"--grid {spec}: start, stop and step must be finite numbers")
        if step <= 0 or stop < start:
            raise ConfigError(f"--grid {spec}: need step > 0 and stop >= start")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        if n > 10_000:
            raise ConfigError(f"--grid {spec}: {n} points is too many (at most 10000)")
        values = [round(start + i * step, 12) for i in range(n)]
        if all(float(v).is_integer() for v in (start, stop, step)):
            values = [int(v) for v in values]
    else:
        values = [parse_value(v, f"--grid {spec}") for v in rhs.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--grid {spec}: no values")
    return name, values


def tune(cfg: RunConfig, grids: list[tuple[str, list]], out: str | Path | None, progress: bool = False) -> dict:
    """Evaluate every point of the grid; points that differ only in tunable filter hyperparameters run
    as one batched run (one row per point and experiment, sharing truth and observations)."""
    if out is not None:
        check_output_dir(out)
    tunable = {f"filter.{n}" for n in type(cfg.filter).tunable}
    batched = [(n, v) for n, v in grids if n in tunable]
    looped = [(n, v) for n, v in grids if n not in tunable]
    names = [n for n, _ in grids]
    base = cfg.model_dump(mode="json", exclude_none=True)
    points = []
    t0 = time.perf_counter()
    for loop_vals in itertools.product(*[v for _, v in looped]):
        over = [f"{n}={v}" for (n, _), v in zip(looped, loop_vals)]
        # validate the batched values too, one point at a time, for a clear error on a bad value
        combos = list(itertools.product(*[v for _, v in batched]))
        for combo in combos:
            validate(RunConfig, apply_overrides(copy.deepcopy(base), over + [f"{n}={v}" for (n, _), v in zip(batched, combo)]))
        sub = validate(RunConfig, apply_overrides(copy.deepcopy(base), over))
        update = {n.split(".", 1)[1]: torch.tensor([c[i] for c in combos for _ in range(sub.batch)], dtype=torch.float64)
                  for i, (n, _) in enumerate(batched)}
        filt = sub.filter.model_copy(update=update) if update else sub.filter
        res = simulate(sub, filt, rows_per_experiment=len(combos), progress=progress)
        for p, combo in enumerate(combos):
            rows = np.arange(p * sub.batch, (p + 1) * sub.batch)
            vals = dict(zip([n for n, _ in looped], loop_vals)) | dict(zip([n for n, _ in batched], combo))
            s = summarize(sub, res, rows)
            s.pop("rank_hist", None)  # a list per point: the tables keep the scalars
            points.append({**{n: vals[n] for n in names}, **s})
    wall = time.perf_counter() - t0
    ok = [p for p in points if not p["diverged"] and math.isfinite(p["armse"])]
    best = min(ok, key=lambda p: p["armse"]) if ok else None
    summary = {"method": cfg.filter.method, "grid": {n: v for n, v in grids}, "points": len(points),
               "best": {n: best[n] for n in names} if best else None,
               "armse": best["armse"] if best else float("nan"), "armse_ci": best["armse_ci"] if best else float("nan"),
               "spread": best["spread"] if best else float("nan"),
               "spread_ratio": best["spread_ratio"] if best else float("nan"), "cycles": cfg.cycles, "diverged": best is None,
               "cycles_per_s": sum(p["cycles"] for p in points) / wall, "wall_s": wall,
               **({k: best[k] for k in ("armse_s", "armse_s_ci")} if best and "armse_s" in best else {})}
    if out is not None:
        _write_tune(cfg, grids, points, summary, Path(out))
    return summary | {"table": points}


def tune_on_seed(path, overrides: list[str], grids: list[str], *, cycles: int, burn_in: int, batch: int,
                 seed: int = 1) -> tuple[dict, dict]:
    """Tune `grids` for the config at `path` (+ `overrides`) by one batched grid run on `seed`, so that
    the best values can be scored on other seeds without selection bias. Returns ({key: best value} ({}
    when every point diverged), the tuning summary)."""
    cfg = load_config(RunConfig, path, overrides + [f"cycles={cycles}", f"burn_in={burn_in}", f"batch={batch}", f"seed={seed}"])
    res = tune(cfg, [parse_grid(g) for g in grids], None)
    return res["best"] or {}, res


def _write_tune(cfg, grids, points, summary, out: Path) -> None:
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    df = pd.DataFrame(points)
    atomic_write_text(out / "tune.csv", df.to_csv(index=False))
    names = [n for n, _ in grids]
    ds = df.set_index(names)[["armse", "armse_ci", "spread", "spread_ratio", "n_diverged"]
                             + [c for c in ("armse_s", "armse_s_ci") if c in df]].to_xarray()
    write_netcdf(ds, out / "tune.nc")
    summary["out"] = str(out)
    write_json(out / "summary.json", summary)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = names[0]
    for key, g in (df.groupby(names[1:]) if len(names) > 1 else [(None, df)]):
        ax.errorbar(g[x], g["armse"], yerr=g["armse_ci"], marker="o", ms=3, capsize=2,
                    label=None if key is None else f"{names[1]}={key[0] if isinstance(key, tuple) else key}")
    ax.set_xlabel(x)
    ax.set_ylabel("aRMSE")
    ax.set_title(f"{cfg.filter.method}: best aRMSE {summary['armse']:.4f} at {summary['best']}" if summary["best"]
                 else f"{cfg.filter.method}: every point diverged", fontsize=9)
    if len(names) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tune.png", dpi=110)
    plt.close(fig)
