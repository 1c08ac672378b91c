"""Sweeps: a base config, a grid of overrides, and what to do at each point, run as independent Dask tasks.

A sweep file (YAML)::

    name: ne_enkf_n            # the sweep's folder under `out` (letters, digits, . _ -)
    kind: run                  # run | tune | train: what each point does (see below)
    base: ../l96/enkf_n.yaml   # the base config, a path relative to the sweep file ...
    # config: {...}            # ... or inline (exactly one of base / config)
    set: ["cycles=3000"]       # overrides for every point: a list of "key=value" or a mapping {key: value}
    grid:                      # the axes: dotted config key -> list of values; points = cartesian product
      filter.N: [5, 10, 20, 40]
    tune: ["infl=1.0:1.1:0.02"]  # kind tune only: the grid given to runner.tune at each point (parse_grid syntax)
    tune_seed: 1               # kind tune only, optional: tune on this seed, score the best values on the point's own
    evaluate:                  # kind train only: the evaluation of each trained network (RunConfig fields)
      cycles: 5000
      batch: 8
      burn_in: 500
    budgets:                   # optional named override lists (list or mapping, like `set`), applied after `set`
      reduced: ["train.max_steps=300", "evaluate.cycles=2000"]
      full: ["train.max_steps=20000", "evaluate.cycles=10000"]
    score: armse               # the summary key the figure plots (default armse)

What a point does:
  run    runner.run_experiment(RunConfig) in the point's folder.
  tune   runner.tune(RunConfig, tune grids) in the point's folder; the point's score is the best-tuned
         aRMSE, and the best hyperparameters are kept (variables `best_<key>` in the results). With
         `tune_seed` the grid runs on that seed instead (in <point>/tuning/), and the point's score is a
         run of the best values on the point's own seed: hyperparameters never chosen on the scored
         truth and observations (`tune_armse` keeps the tuning run's best score).
  train  trainer.train(TrainRunConfig) in <sweep>/train-<hash>/, then the best network (train-<hash>/best)
         is evaluated with runner.run_experiment on a RunConfig built like `danlab eval`: model and
         observations of the training, filter {method: learned, checkpoint, N: train.N}, defaults
         seed 0, cycles 10000, burn_in 500, batch 8, then the `evaluate` block on top. Keys that start
         with `evaluate.` (in `set`, budgets or the grid) apply to that evaluation config only, e.g. an axis
         `evaluate.observations.fraction` evaluates one trained network at several observation densities.
         Points whose resolved training configs are identical share ONE training task (deduplicated by
         a hash of that config); their evaluation tasks depend on it through Dask futures.
Overrides apply in this order: base, `set`, the budget, the grid point (and, for the evaluation, the
`evaluate` block before the `evaluate.` keys). Every config's `threads` is set to the sweep's `threads`.

The budget: `budget=NAME` picks budgets[NAME]; by default `reduced` when the file defines it, else none.
With a budget the sweep's folder is <out>/<name>-<budget>, so that a reduced and a full run of the same
sweep live side by side; without, <out>/<name>.

Folders: <sweep>/<point-id>/ per point, where point-id is readable and stable, e.g. `filter.N=20` or
`filter.N=20,filter.infl=1.05`. A task writes its run folder, then `done.json` (its summary, with the hash of
its resolved config) LAST and atomically. On a rerun a point whose done.json matches its config is skipped
(its summary is read back), so a killed sweep loses only the points that were in flight, and a killed
training resumes from its last checkpoint. A point that fails (bad config value, exception, dead worker)
writes `error.txt` (one line, the traceback below it), is listed in the report and retried on the next run;
the other points go on. A done.json written for a different config (e.g. after a code change of a default)
is not overwritten: the point is reported failed until its folder is deleted. `--only axis=value` (repeatable)
runs a part of the grid now and the rest later in the same folder: the points it leaves out are not run, those
finished before are gathered all the same, the others get status 2 (not run).

The results: <sweep>/results.nc (xarray, one dimension per axis named by its dotted key, the values as
coordinates; variables armse, armse_ci, spread, spread_ratio, cycles_per_s, n_diverged, the `score` if another one,
best_<key> for tune, val_armse for train, point (the id) and status: 0 done, 1 failed, 2 not run), results.csv (one
row per point), results.png (the score against the first axis, one line per combination of the others,
error bars from armse_ci) and sweep.yaml (the resolved sweep, base config inline, with the budget used).

Scheduler: None -> a dask.distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True),
closed at the end; "tcp://host:port" -> that existing scheduler (its workers must import danlab and see
`out` on a shared file system; paths are made absolute); "synchronous" -> no Dask, the tasks run one after
the other in this process (for debugging); a distributed.Client is used as it is.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from danlab.config import ConfigError, Strict, apply_overrides, parse_value, read_yaml, validate
from danlab.io import atomic_write_text, check_output_dir, write_json

DONE, ERROR = "done.json", "error.txt"
SCORES = ("armse", "armse_ci", "spread", "spread_ratio", "cycles_per_s", "n_diverged")
EVAL_DEFAULTS = {"seed": 0, "cycles": 10_000, "burn_in": 500, "batch": 8}
EVAL_PREFIX = "evaluate."


# ---- the sweep file -------------------------------------------------------------------------------

Overrides = dict[str, Any] | list[str]


class Sweep(Strict):
    """A validated sweep file (see the module docstring). `config` is the base config, read or inline."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    kind: Literal["run", "tune", "train"]
    base: str | None = Field(None, description="the base config's path as written in the sweep file")
    config: dict[str, Any]
    set: Overrides = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    tune: list[str] = Field(default_factory=list)
    tune_seed: int | None = Field(None, ge=0, description="kind tune: the seed the grid is tuned on (None: the scored one)")
    evaluate: dict[str, Any] = Field(default_factory=dict)
    budgets: dict[str, Overrides] = Field(default_factory=dict)
    budget: str | None = Field(None, description="the budget in use (a key of budgets)")
    score: str = "armse"

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.budget}" if self.budget else self.name

    def overrides(self) -> list[tuple[str, Any]]:
        """`set` then the budget's overrides, as (dotted key, value) pairs."""
        return _pairs(self.set, "set") + (_pairs(self.budgets[self.budget], f"budgets.{self.budget}")
                                          if self.budget else [])

    def tune_grids(self) -> list[tuple[str, list]]:
        from danlab.experiments.runner import parse_grid
        return [parse_grid(g) for g in self.tune]

    def with_budget(self, budget: str | None) -> "Sweep":
        return self.model_copy(update={"budget": _pick_budget(self.budgets, budget)})

    def resolved(self) -> dict:
        """The sweep as written to sweep.yaml: base config inline, overrides of the budget spelled out."""
        d = self.model_dump(mode="json")
        d["overrides"] = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.overrides()]
        return d


def _pairs(over, where: str) -> list[tuple[str, Any]]:
    if isinstance(over, dict):
        return [(str(k), v) for k, v in over.items()]
    out = []
    for item in over:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{where}: expected key.sub=value (got {item!r})")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v, f"{where}: {item}")))
    return out


def _selection(s: Sweep, only: list[str] | None) -> dict[str, list]:
    """`--only key=value` items as {axis: [values]}: a point is selected when each named axis holds one of its listed
    values. Raises ConfigError for a key that is not an axis or a value that is not on it."""
    chosen: dict[str, list] = {}
    for key, value in _pairs(only or [], "--only"):
        if key not in s.grid:
            raise ConfigError(f"--only {key}={_fmt(value)}: {key} is not an axis of the grid (axes: {', '.join(s.grid)})")
        if value not in s.grid[key]:
            raise ConfigError(f"--only {key}={_fmt(value)}: not a value of the axis (it has {s.grid[key]})")
        chosen.setdefault(key, []).append(value)
    return chosen


def _pick_budget(budgets: dict, budget: str | None) -> str | None:
    if budget is None:
        return "reduced" if "reduced" in budgets else None
    if budget not in budgets:
        have = ", ".join(budgets) or "none defined"
        raise ConfigError(f"budget: unknown budget {budget!r} (have: {have})")
    return budget


def _check(s: Sweep) -> None:
    """What pydantic cannot see: axes, key routing, the tune grid; raises ConfigError naming the field."""
    if not s.grid:
        raise ConfigError("grid: at least one axis is needed")
    for key, values in s.grid.items():
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"grid.{key}: not a dotted config key")
        if not values:
            raise ConfigError(f"grid.{key}: no values")
        labels = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"grid.{key}: repeated values {values}")
    keys = list(s.grid) + [k for k, _ in s.overrides()]
    if s.kind != "train":
        bad = [k for k in keys if k.startswith(EVAL_PREFIX)]
        if bad:
            raise ConfigError(f"{bad[0]}: `evaluate.` keys are only for kind train")
        if s.evaluate:
            raise ConfigError("evaluate: only for kind train")
    if s.kind == "tune":
        if not s.tune:
            raise ConfigError("tune: kind tune needs a tune grid, e.g. [\"infl=1.0:1.1:0.02\"]")
        names = [n for n, _ in s.tune_grids()]
        clash = set(names) & set(s.grid)
        if clash:
            raise ConfigError(f"tune: {sorted(clash)[0]} is also a sweep axis")
    elif s.tune:
        raise ConfigError("tune: only for kind tune")
    if s.tune_seed is not None:
        if s.kind != "tune":
            raise ConfigError("tune_seed: only for kind tune")
        if "seed" in keys:
            raise ConfigError("tune_seed: the scored seed is an axis or override; tune_seed must differ from every "
                              "one of them, so give the scored seed in the base config")
        if s.tune_seed == s.config.get("seed", 0):
            raise ConfigError(f"tune_seed: {s.tune_seed} is the scored seed too; choose another")
    if s.budget is not None and s.budget not in s.budgets:
        raise ConfigError(f"budget: unknown budget {s.budget!r}")


def load_sweep(path: str | Path, budget: str | None = None) -> Sweep:
    """Read and validate a sweep file; `budget` picks one of its budgets (default: `reduced` if defined)."""
    path = Path(path)
    data = read_yaml(path)
    try:
        if "base" in data and "config" in data:
            raise ConfigError("base, config: give one of them, not both")
        if "base" in data:
            if not isinstance(data["base"], str):
                raise ConfigError(f"base: expected a path (got {data['base']!r})")
            data["config"] = read_yaml(path.parent / data["base"])
        elif "config" not in data:
            raise ConfigError("base: missing (a config path, or an inline `config:` mapping)")
        if "budget" in data:
            raise ConfigError("budget: unknown key (choose a budget with budget=NAME / --budget NAME)")
        budgets = data.get("budgets") or {}
        data["budget"] = _pick_budget(budgets, budget) if isinstance(budgets, dict) else None
        sweep = validate(Sweep, data)
        _check(sweep)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return sweep


# ---- points ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class Point:
    id: str
    index: tuple[int, ...]
    values: dict[str, Any]
    dir: Path
    config: dict | None = None  # the resolved run/eval config (plain data), None if it is invalid
    hash: str | None = None
    train: "Training | None" = None
    error: str | None = None


@dataclass(eq=False)
class Training:
    hash: str
    dir: Path
    config: dict
    points: list[Point] = field(default_factory=list)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int | str):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def _short_hash(obj, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def point_id(values: dict[str, Any]) -> str:
    """A readable, stable folder name for a grid point, e.g. `filter.N=20,filter.infl=1.05`."""
    text = ",".join(f"{k}={_fmt(v)}" for k, v in values.items())
    text = re.sub(r"[^A-Za-z0-9._=+,\-]", "_", text)
    if len(text) > 120:
        text = f"{text[:100]}-{_short_hash(values)}"
    return text


def _set_key(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = copy.deepcopy(value)


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _dump(cfg) -> dict:
    return cfg.model_dump(mode="json", exclude_none=True)


def _strip(d: dict, *keys: str) -> dict:
    """A deep copy of d without the dotted keys (for hashing what a config computes, not how)."""
    d = copy.deepcopy(d)
    for key in keys:
        node, parts = d, key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return d


def _expand(s: Sweep, root: Path, threads: int) -> tuple[list[Point], list[Training]]:
    """Every grid point with its resolved, validated config (or its error), and the distinct trainings."""
    from danlab.experiments.run_config import RunConfig, learned_eval_data
    from danlab.training.train_config import TrainRunConfig

    axes = list(s.grid)
    over = s.overrides()
    points, trainings = [], {}
    for index in itertools.product(*[range(len(s.grid[a])) for a in axes]):
        values = {a: s.grid[a][i] for a, i in zip(axes, index)}
        p = Point(point_id(values), index, values, root / point_id(values))
        points.append(p)
        pairs = over + list(values.items())
        try:
            if s.kind in ("run", "tune"):
                data = copy.deepcopy(s.config)
                for k, v in pairs:
                    _set_key(data, k, v)
                data["threads"] = threads
                cfg = validate(RunConfig, data)
                p.config = _dump(cfg)
                p.hash = _short_hash({"kind": s.kind, "config": _strip(p.config, "threads"),
                                      "tune": s.tune_grids() if s.kind == "tune" else None,
                                      **({"tune_seed": s.tune_seed} if s.tune_seed is not None else {})}, 16)
            else:
                tdata = copy.deepcopy(s.config)
                for k, v in pairs:
                    if not k.startswith(EVAL_PREFIX):
                        _set_key(tdata, k, v)
                _set_key(tdata, "train.threads", threads)
                tcfg = validate(TrainRunConfig, tdata)
                tdump = _dump(tcfg)
                thash = _short_hash(_strip(tdump, "train.threads"))
                t = trainings.setdefault(thash, Training(thash, root / f"train-{thash}", tdump))
                edata = _merge(learned_eval_data(tdump, t.dir / "best", **EVAL_DEFAULTS), s.evaluate)
                for k, v in pairs:
                    if k.startswith(EVAL_PREFIX):
                        _set_key(edata, k[len(EVAL_PREFIX):], v)
                edata["threads"] = threads
                p.config = _dump(validate(RunConfig, edata))
                p.hash = _short_hash({"kind": "train", "train": thash,
                                      "eval": _strip(p.config, "threads", "filter.checkpoint")}, 16)
                p.train = t
                t.points.append(p)
        except ConfigError as exc:
            p.error = f"ConfigError: {exc}"
    ids = [p.id for p in points]
    if len(set(ids)) < len(ids):  # distinct values that read alike once sanitised: disambiguate
        for p in points:
            if ids.count(p.id) > 1:
                p.id = f"{p.id}-{_short_hash(p.values, 6)}"
                p.dir = root / p.id
    return points, list(trainings.values())


def grid_points(s: Sweep) -> list[Point]:
    """Every grid point of a sweep with its id, axis values and config hash, as `run_sweep` computes them (a point
    with the same hash in two sweeps is the same computation)."""
    return _expand(s, Path("."), 1)[0]


# ---- tasks (run on the Dask workers; module-level so that they pickle by reference) -----------------

def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _write_error(directory: Path, line: str, tb: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / ERROR, line + "\n" + (f"\n{tb}" if tb else ""))


def _read_done(directory: Path) -> dict | None:
    try:
        return json.loads((directory / DONE).read_text())
    except (OSError, ValueError):
        return None


def train_task(spec: dict, threads: int) -> dict:
    """Train (or resume) one network; returns {"status": "ok", ...} or {"status": "failed", "error": ...}."""
    import torch
    from danlab.training.train_config import TrainRunConfig
    from danlab.training.trainer import train

    torch.set_num_threads(threads)
    d = Path(spec["dir"])
    try:
        cfg = validate(TrainRunConfig, copy.deepcopy(spec["config"]))
        d.mkdir(parents=True, exist_ok=True)
        (d / ERROR).unlink(missing_ok=True)
        res = train(cfg, d, resume=(d / "checkpoint.json").exists(), progress=False)
        record = {"hash": spec["hash"], "dir": str(d), **res}
        write_json(d / DONE, record)
        return {"status": "ok", **record}
    except Exception as exc:  # noqa: BLE001 - a failed task is reported, never fatal to the sweep
        line = _one_line(exc)
        _write_error(d, line, traceback.format_exc())
        return {"status": "failed", "error": line}


def point_task(spec: dict, threads: int, training: dict | None = None) -> dict:
    """Run one point (kind run, tune, or the evaluation of a trained network) and write its done.json."""
    import torch
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import run_experiment, tune

    torch.set_num_threads(threads)
    d = Path(spec["dir"])
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / ERROR).unlink(missing_ok=True)
        if training is not None and training.get("status") != "ok":
            raise RuntimeError(f"training {spec['train_hash']} failed: {training.get('error')}")
        cfg = validate(RunConfig, copy.deepcopy(spec["config"]))
        t0 = time.perf_counter()
        if spec["kind"] == "tune" and spec.get("tune_seed") is not None:
            summary = _tune_then_score(cfg, spec, d)
        elif spec["kind"] == "tune":
            summary = tune(cfg, [tuple(g) for g in spec["tune"]], d, progress=False)
            table = summary.pop("table")
            best = summary.get("best")
            row = next((r for r in table if best and all(r[k] == v for k, v in best.items())), None)
            summary["n_diverged"] = row["n_diverged"] if row else _fewest_diverged(table)
        else:
            summary = run_experiment(cfg, d, progress=False)
        record = {"point": spec["id"], "values": spec["values"], "kind": spec["kind"], "config_hash": spec["hash"],
                  **summary, "task_wall_s": time.perf_counter() - t0}
        if training is not None:
            record["training"] = {k: training.get(k) for k in ("hash", "dir", "step", "best_val_armse", "wall_s")}
            record["val_armse"] = training.get("best_val_armse")
        write_json(d / DONE, record)  # last: its presence means the point is finished
        return {"status": "ok", "id": spec["id"], "record": record}
    except Exception as exc:  # noqa: BLE001
        line = _one_line(exc)
        _write_error(d, line, traceback.format_exc())
        return {"status": "failed", "id": spec["id"], "error": line}


def _tune_then_score(cfg, spec: dict, d: Path) -> dict:
    """Tune on spec["tune_seed"] (in d/tuning), then run the best values on cfg's own seed (in d)."""
    from danlab.experiments.runner import run_experiment, tune

    tuned = tune(cfg.model_copy(update={"seed": spec["tune_seed"]}), [tuple(g) for g in spec["tune"]], d / "tuning",
                 progress=False)
    best = tuned.get("best")
    if not best:  # a result, as in a plain tune point: diverged at every tuned value, nothing to score on cfg's seed
        table = tuned.pop("table")
        return {**tuned, "best": None, "tune_seed": spec["tune_seed"], "tune_armse": math.nan,
                "n_diverged": _fewest_diverged(table)}
    data = apply_overrides(cfg.model_dump(mode="json", exclude_none=True), [f"{k}={v}" for k, v in best.items()])
    summary = run_experiment(validate(type(cfg), data), d, progress=False)
    return {**summary, "best": best, "tune_seed": spec["tune_seed"], "tune_armse": tuned["armse"]}


def _fewest_diverged(table: list[dict]) -> int:
    """A tune point lost at every tuned value counts the divergences of its least bad value."""
    return min(r["n_diverged"] for r in table)


# ---- execution -------------------------------------------------------------------------------------

class _Synchronous:
    """Stand-in for a Dask client: runs each task when it is submitted (for debugging)."""

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args, pure=False):
        args = [a.value if isinstance(a, self.Done) else a for a in args]
        return self.Done(fn(*args))


SCHEDULER_TIMEOUT_S = 10
_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://[^\s/:]+(:\d{1,5})?/?$")


def check_scheduler(scheduler) -> None:
    """Refuse, before anything runs, a scheduler argument that is neither 'synchronous' nor an address."""
    if scheduler is None or scheduler == "synchronous" or not isinstance(scheduler, str):
        return
    if not _ADDRESS.match(scheduler):
        raise ConfigError(f"--scheduler {scheduler}: expected 'synchronous' or a Dask scheduler address, "
                          "e.g. tcp://host:8786")


def _client(scheduler, workers: int):
    """(client, closer) for the scheduler argument."""
    if scheduler == "synchronous":
        return _Synchronous(), lambda: None
    import logging

    from distributed import Client, LocalCluster
    if isinstance(scheduler, Client):
        return scheduler, lambda: None
    if scheduler is None:
        # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536 (to give memory back to the OS), which also
        # turns off glibc's adaptive mmap threshold: every tensor above 128 KiB is then mmapped, page-faulted in and
        # unmapped again at each use. A training step of configs/l96/dan_fast.yaml took 3.2x as long that way (half
        # of it in the kernel): benchmarks/sweep_worker_env.py. Our workers keep the default allocator.
        import dask
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
        client = Client(cluster)

        def close():
            client.close()
            cluster.close()
        return client, close
    if isinstance(scheduler, str):
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"--scheduler {scheduler}: cannot reach the scheduler ({_one_line(exc)})") from None
        return client, client.close
    raise ConfigError(f"scheduler: expected None, 'synchronous', an address or a Client (got {scheduler!r})")


def _adopt_finished_training(t: Training) -> dict | None:
    """The same network (same training hash: same config but threads) finished by another sweep in the same parent
    folder, copied into this sweep's train-<hash> folder (e.g. the centre point every medium-budget study shares),
    so that its points evaluate it instead of training it again. None if there is none."""
    for other in sorted(t.dir.parent.parent.glob(f"*/train-{t.hash}")):
        done = _read_done(other)
        if other == t.dir or not done or done.get("hash") != t.hash:
            continue
        tmp = t.dir.with_name(t.dir.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(other, tmp)
        done = {**done, "dir": str(t.dir), "copied_from": str(other)}
        write_json(tmp / DONE, done)
        shutil.rmtree(t.dir, ignore_errors=True)  # an unfinished run of the same network: the finished one replaces it
        tmp.rename(t.dir)
        return done
    return None


def _execute(client, sweep: Sweep, todo: list[Point], trainings: list[Training], threads: int, log) -> dict:
    """Submit the tasks, collect the results as they complete; returns {point id: task result}."""
    train_futs = {}
    for t in trainings:
        if not any(p in todo for p in t.points):
            continue
        done = _read_done(t.dir)
        if not (done and done.get("hash") == t.hash):
            done = _adopt_finished_training(t)  # None, or a finished run of this very hash
        if done:
            train_futs[t.hash] = {"status": "ok", **done}
        else:
            spec = {"dir": str(t.dir), "config": t.config, "hash": t.hash}
            train_futs[t.hash] = client.submit(train_task, spec, threads, pure=False)
    futs = {}
    tune_grids = [list(g) for g in sweep.tune_grids()] if sweep.kind == "tune" else None
    for p in todo:
        spec = {"id": p.id, "dir": str(p.dir), "kind": sweep.kind, "config": p.config, "hash": p.hash,
                "values": p.values, "tune": tune_grids, "tune_seed": sweep.tune_seed, "train_hash": p.train.hash if p.train else None}
        args = (spec, threads) + ((train_futs[p.train.hash],) if p.train else ())
        futs[client.submit(point_task, *args, pure=False)] = p
    results = {}
    if isinstance(client, _Synchronous):
        completed = iter(futs)
    else:
        from distributed import as_completed
        completed = as_completed(list(futs))
    for fut in completed:
        p = futs[fut]
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
            res = {"status": "failed", "id": p.id, "error": _one_line(exc)}
            _write_error(p.dir, res["error"], "".join(traceback.format_exception(exc)))
        results[p.id] = res
        log(p, res)
    return results


# ---- results ---------------------------------------------------------------------------------------

def _coord(values: list):
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=float if any(isinstance(v, float) for v in values) else int)
    if all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=object)
    return np.asarray([_fmt(v) for v in values], dtype=object)


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def gather(sweep: Sweep, points: list[Point], records: dict[str, dict], errors: dict[str, str],
           not_run: set[str] = frozenset()):
    """The results as an xarray Dataset (one dimension per axis) and a pandas DataFrame (one row per point); status
    0 done, 1 failed, 2 not run (left out by `only`)."""
    import pandas as pd
    import xarray as xr

    axes = list(sweep.grid)
    shape = tuple(len(sweep.grid[a]) for a in axes)
    names = list(SCORES) + ([sweep.score] if sweep.score not in SCORES else [])
    if sweep.kind == "tune":
        keys = sorted({k for r in records.values() for k, v in (r.get("best") or {}).items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
        names += [f"best_{k}" for k in keys] + (["tune_armse"] if sweep.tune_seed is not None else [])
    if sweep.kind == "train":
        names.append("val_armse")
    data = {n: np.full(shape, np.nan) for n in names}
    status = np.ones(shape, dtype=np.int8)
    ids = np.empty(shape, dtype=object)
    rows = []
    for p in points:
        r = records.get(p.id)
        ids[p.index] = p.id
        row = {"point": p.id, **{a: _fmt(v) if not isinstance(v, int | float | str) else v for a, v in p.values.items()}}
        if p.id in not_run:
            status[p.index] = 2
        if r is not None:
            status[p.index] = 0
            for n in names:
                v = (r.get("best") or {}).get(n[5:]) if n.startswith("best_") else r.get(n)
                data[n][p.index] = _num(v)
        row |= {"status": int(status[p.index]), **{n: data[n][p.index] for n in names},
                "error": errors.get(p.id, ""), "dir": str(p.dir)}
        rows.append(row)
    dims = tuple(axes)
    ds = xr.Dataset({n: (dims, v) for n, v in data.items()}, coords={a: _coord(sweep.grid[a]) for a in axes})
    ds["status"] = (dims, status)
    ds["status"].attrs["long_name"] = "0: done, 1: failed, 2: not run"
    ds["point"] = (dims, ids.astype(str))
    ds.attrs.update({"sweep": sweep.name, "kind": sweep.kind, "budget": sweep.budget or "", "score": sweep.score,
                     "sweep_yaml": yaml.safe_dump(sweep.resolved(), sort_keys=False)})
    return ds, pd.DataFrame(rows)


def plot(ds, sweep: Sweep, path: Path) -> None:
    """The score against the first axis, one line per combination of the other axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(sweep.grid)
    x_name, others = axes[0], axes[1:]
    xs = ds[x_name].values
    numeric = np.issubdtype(xs.dtype, np.number)
    xpos = xs.astype(float) if numeric else np.arange(len(xs))
    ci = "armse_ci" if sweep.score == "armse" else f"{sweep.score}_ci"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for combo in itertools.product(*[range(ds.sizes[a]) for a in others]):
        sel = ds.isel(dict(zip(others, combo)))
        y = sel[sweep.score].values
        err = sel[ci].values if ci in sel else None
        label = ", ".join(f"{a}={_fmt(sel[a].values.item())}" for a in others) or None
        ax.errorbar(xpos, y, yerr=err, marker="o", ms=3, capsize=2, label=label)
    if numeric and np.all(xpos > 0) and xpos.max() / xpos.min() >= 8:
        ax.set_xscale("log")
    y = ds[sweep.score].values
    y = y[np.isfinite(y)]
    if y.size and np.all(y > 0) and y.max() / y.min() >= 10:
        ax.set_yscale("log")
    if numeric:
        ax.set_xticks(xpos, [_fmt(v.item()) for v in xs])
        ax.minorticks_off()
    else:
        ax.set_xticks(xpos, [str(v) for v in xs], rotation=30, ha="right")
    ax.set_xlabel(x_name)
    ax.set_ylabel(sweep.score)
    failed = int(ds["status"].sum())
    ax.set_title(f"sweep {sweep.name} ({sweep.kind}{', ' + sweep.budget if sweep.budget else ''})"
                 + (f", {failed} failed" if failed else ""), fontsize=10)
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


# ---- the sweep -------------------------------------------------------------------------------------

def run_sweep(path_or_sweep: str | Path | Sweep, out: str | Path = "runs/sweeps", scheduler=None, workers: int = 2,
              budget: str | None = None, threads: int = 1, progress: bool = True, only: list[str] | None = None) -> dict:
    """Run every point of a sweep not finished yet, then gather all results into <out>/<sweep folder>/.

    `only` (["axis=value", ...]) runs just the points that hold one of the listed values on each named axis; the
    others are not run, but those finished earlier are gathered all the same (status 2 marks the rest: not run).
    Returns {"name", "dir", "points", "done", "skipped", "not_run", "failed": [(point_id, error)], "results": path
    of results.nc, "dataset": xr.Dataset}: `done` counts the points finished in this call, `skipped` those found
    finished. Raises ConfigError for a bad sweep file or `only` (never for a bad point).
    """
    from danlab.experiments.runner import write_netcdf

    if isinstance(path_or_sweep, Sweep):
        sweep = path_or_sweep.with_budget(budget if budget is not None else path_or_sweep.budget)
        _check(sweep)
    else:
        sweep = load_sweep(path_or_sweep, budget)
    chosen = _selection(sweep, only)
    if workers < 1 or threads < 1:
        raise ConfigError(f"workers and threads must be >= 1 (got workers={workers}, threads={threads})")
    check_scheduler(scheduler)
    check_output_dir(out)
    if scheduler is None:  # our own LocalCluster: its workers' PyTorch threads must not oversubscribe the cores
        from danlab.resources import cores
        if workers * threads > cores():
            pinned = max(1, cores() // workers)
            if progress:
                print(f"sweep: {workers} workers × {threads} threads > {cores()} cores: {pinned} thread(s) per task",
                      file=sys.stderr, flush=True)
            threads = pinned
    early = None
    if isinstance(scheduler, str) and scheduler != "synchronous":  # a dead address is refused before anything is said
        early = _client(scheduler, workers)
    root = Path(out).resolve() / sweep.folder_name
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "sweep.yaml", yaml.safe_dump(sweep.resolved(), sort_keys=False))
    points, trainings = _expand(sweep, root, threads)

    records, errors, todo, not_run = {}, {}, [], set()
    skipped = 0
    for p in points:
        done = _read_done(p.dir)
        if done is not None and not p.error and done.get("config_hash") == p.hash:
            records[p.id] = done
            skipped += 1
        elif not all(p.values[k] in vs for k, vs in chosen.items()):
            not_run.add(p.id)
        elif p.error:
            errors[p.id] = p.error
            _write_error(p.dir, p.error)
        elif done is None:
            todo.append(p)
        else:
            errors[p.id] = (f"{p.dir / DONE} holds the result of another config (hash {done.get('config_hash')}, "
                            f"now {p.hash}); delete the folder to rerun the point")

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"sweep {sweep.name}: {len(points)} points, {skipped} already done, {len(todo)} to run"
        + (f", {len(errors)} invalid" if errors else "") + (f", {len(not_run)} not selected" if not_run else "")
        + f" -> {root}")
    t0 = time.perf_counter()
    count = [0]

    def log(p: Point, res: dict) -> None:
        count[0] += 1
        if res["status"] == "ok":
            r = res["record"]
            if sweep.score == "armse":
                from danlab.experiments.runner import format_score
                shown = format_score(r)
            else:
                shown = f"{_num(r.get(sweep.score)):.4g}"
            say(f"[{count[0]}/{len(todo)}] {p.id}: {sweep.score} {shown} ({time.perf_counter() - t0:.0f} s)")
        else:
            say(f"[{count[0]}/{len(todo)}] {p.id}: FAILED {res['error']}")

    if early is not None and not todo:
        early[1]()
    if todo:
        client, close = early or _client(scheduler, workers)
        try:
            results = _execute(client, sweep, todo, trainings, threads, log)
        finally:
            close()
        for pid, res in results.items():
            if res["status"] == "ok":
                records[pid] = res["record"]
            else:
                errors[pid] = res["error"]

    ds, df = gather(sweep, points, records, errors, not_run)
    write_netcdf(ds, root / "results.nc")
    atomic_write_text(root / "results.csv", df.to_csv(index=False))
    plot(ds, sweep, root / "results.png")
    failed = [(p.id, errors[p.id]) for p in points if p.id in errors]
    if failed:
        say(f"sweep {sweep.name}: {len(failed)} of {len(points)} points failed:")
        for pid, err in failed:
            say(f"  {pid}: {err}")
    say(f"results in {root / 'results.nc'}")
    return {"name": sweep.name, "dir": str(root), "points": len(points),
            "done": sum(1 for p in todo if p.id in records), "skipped": skipped, "not_run": len(not_run), "failed": failed,
            "results": str(root / "results.nc"), "dataset": ds}
