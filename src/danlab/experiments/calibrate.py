"""`danlab calibrate`: choose a learned ensemble's observation perturbation so that its spread matches its error.

A network run as an ensemble (Ne = N > 1 members) takes each member's own innovation against observations
perturbed by `perturb` × N(0, R) (filters: `Learned.perturb`); the perturbation sets the spread far more than the
mean (weights/l96_nf40_ne10/README.md). Calibrating it is the learned ensemble's analogue of tuning a classical
filter's inflation: a grid of values is evaluated on held-out trajectories of a seed that is not the scoring one,
and the value kept is the one whose spread / aRMSE is nearest the ratio of a calibrated ensemble.

For N members that are exchangeable with the truth (a calibrated ensemble: each is a draw from the same law
as the truth given the observations), the error of the mean has variance (1 + 1/N) σ² per site and the
(N - 1)-normalised spread estimates σ²: spread / RMSE of the mean = sqrt(N / (N + 1)) (0.953 for N = 10), and
the truth's rank among the members is uniform.

With --write the choice is recorded in the network's sidecar (model.json, key `calibrated`, with how it was
measured), where `Learned` takes it as its default perturbation for that N.
"""

from __future__ import annotations

import math
from pathlib import Path

from danlab.config import ConfigError, load_config
from danlab.experiments.run_config import RunConfig, learned_eval_data
from danlab.experiments.runner import tune
from danlab.io import code_version
from danlab.learned import load_net, resolve_net_dir, write_calibration


def calibrated_ratio(N: int) -> float:
    """spread / RMSE of the mean of a calibrated ensemble of N members (see the module docstring)."""
    return math.sqrt(N / (N + 1))


def calibrate(checkpoint: str | Path, values: list[float], *, N: int | None = None, cycles: int = 2000,
              burn_in: int = 300, batch: int = 4, seed: int = 7, overrides: list[str] | None = None,
              out: str | Path | None = None, write: bool = False, progress: bool = False) -> dict:
    """Evaluate the network at each perturbation in `values` (seed `seed`), keep the one whose spread / aRMSE
    is nearest `calibrated_ratio(N)`; with `write`, record it in the network's sidecar."""
    directory = resolve_net_dir(checkpoint)
    _, meta = load_net(directory)
    data = learned_eval_data(meta.get("trained_with", {}), directory, seed=seed, cycles=cycles, burn_in=burn_in,
                             batch=batch, N=N)
    cfg = load_config(RunConfig, None, overrides or [], data=data)
    if cfg.filter.N < 2:
        raise ConfigError(f"calibrate: {directory} runs as a single state here (N = {cfg.filter.N}), which has no "
                          "spread to calibrate; give --N 2 or more")
    if not values:
        raise ConfigError("calibrate: --grid gave no values")
    if write and getattr(cfg.filter, "control", None) is not None:
        raise ConfigError("calibrate --write: the sidecar's perturbation is that of the ensemble without a control; "
                          "for one recentred on filter.control, give the chosen filter.perturb in its config")
    res = tune(cfg, [("filter.perturb", list(values))], out, progress=progress)
    target = calibrated_ratio(cfg.filter.N)
    points = [{"perturb": p["filter.perturb"], "armse": p["armse"], "armse_ci": p["armse_ci"], "spread": p["spread"],
               "spread_ratio": p["spread_ratio"], "n_diverged": p["n_diverged"]} for p in res["table"]]
    ok = [p for p in points if not p["n_diverged"] and math.isfinite(p["spread_ratio"])]
    if not ok:
        raise ConfigError(f"calibrate: at every perturbation of the grid the ensemble diverged or had no spread "
                          f"({', '.join(str(p['perturb']) for p in points)})")
    best = min(ok, key=lambda p: abs(p["spread_ratio"] - target))
    record = {"perturb": best["perturb"], "N": cfg.filter.N, "target_ratio": target,
              "spread_ratio": best["spread_ratio"], "armse": best["armse"], "armse_ci": best["armse_ci"],
              "criterion": "spread / aRMSE nearest sqrt(N / (N + 1)), the ratio of a calibrated ensemble",
              "seed": seed, "cycles": cycles, "burn_in": min(burn_in, cycles - 1), "batch": batch,
              "overrides": list(overrides or []), "grid": points, "code_version": code_version()}
    on_edge = len(points) > 1 and best["perturb"] in (min(values), max(values))
    if write:
        write_calibration(directory, record)
    return record | {"written": write, "on_edge": on_edge, "checkpoint": str(directory)}
