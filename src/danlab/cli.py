"""`danlab` command line: run, tune, train, eval (and the reproduction harness).

Every command exits with status 2 and one line `danlab: error: ...` on a bad config, a missing file or
an unusable checkpoint, never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from danlab.config import ConfigError, load_config
from danlab.training.checkpoint import CheckpointError


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_summary(summary: dict, as_json: bool) -> None:
    s = {k: v for k, v in summary.items() if k != "table"}
    if as_json:
        print(json.dumps(s, default=str))
        return
    for p in summary.get("table", []):
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()
                               if k in s.get("grid", {}) or k in {"armse", "armse_ci", "n_diverged"}))
    line = f"{s['method']}: aRMSE {s['armse']:.4f} ± {s['armse_ci']:.4f}"
    if "best" in s:
        line += f" at {s['best']}"
    if "spread" in s:
        line += f", spread {s['spread']:.4f}"
    line += f", {s['cycles_per_s']:.0f} cycles/s" + (", DIVERGED" if s.get("diverged") else "")
    print(line)
    if "out" in s:
        print(f"results in {s['out']}")


def cmd_run(a) -> int:
    from danlab.experiments.config import RunConfig
    from danlab.experiments.runner import run_experiment
    cfg = load_config(RunConfig, a.config, a.set)
    out = a.out or _default_out(cfg.filter.method)
    _print_summary(run_experiment(cfg, out, progress=a.progress), a.json)
    return 0


def cmd_tune(a) -> int:
    from danlab.experiments.config import RunConfig
    from danlab.experiments.runner import parse_grid, tune
    cfg = load_config(RunConfig, a.config, a.set)
    grids = [parse_grid(g) for g in a.grid]
    out = a.out or _default_out(f"tune-{cfg.filter.method}")
    _print_summary(tune(cfg, grids, out, progress=a.progress), a.json)
    return 0


def cmd_train(a) -> int:
    from danlab.training.config import TrainRunConfig
    from danlab.training.trainer import train
    if a.resume:
        run_dir = Path(a.resume)
        cfg = load_config(TrainRunConfig, run_dir / "config.yaml", a.set)
    else:
        if not a.config:
            raise ConfigError("train: give a CONFIG.yaml, or --resume RUN_DIR")
        cfg = load_config(TrainRunConfig, a.config, a.set)
        run_dir = Path(a.out) if a.out else _default_out("train")
    result = train(cfg, run_dir, resume=bool(a.resume), stop_after=a.stop_after, progress=not a.quiet)
    print(json.dumps(result | {"run_dir": str(run_dir)}))
    return 0


def cmd_eval(a) -> int:
    from danlab.experiments.config import RunConfig, learned_eval_data
    from danlab.experiments.runner import run_experiment
    from danlab.learned import load_net, resolve_net_dir
    _, meta = load_net(a.checkpoint)
    data = learned_eval_data(meta.get("trained_with", {}), resolve_net_dir(a.checkpoint), seed=a.seed, cycles=a.cycles,
                             burn_in=a.burn_in, batch=a.batch, Nx=a.nx, N=a.N)
    cfg = load_config(RunConfig, None, a.set, data=data)
    out = a.out or _default_out("eval")
    _print_summary(run_experiment(cfg, out, progress=a.progress), a.json)
    return 0


def cmd_sweep(a) -> int:
    from danlab.experiments.sweep import run_sweep
    r = run_sweep(a.sweep, out=a.out or "runs/sweeps", scheduler=a.scheduler, workers=a.workers,
                  budget=a.budget, threads=a.threads, progress=not a.quiet)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k != "dataset"}, default=str))
    else:
        print(f"{r['name']}: {r['points']} points, {r['done']} done, {r['skipped']} skipped, {len(r['failed'])} failed; results in {r['results']}")
    return 1 if r["failed"] else 0


def cmd_export(a) -> int:
    from danlab.training.export import export
    prov = export(a.run_dir, a.dest, cycles=a.cycles, burn_in=a.burn_in, batch=a.batch, seed=a.seed)
    ev = prov["evaluation"]
    print(f"{a.dest}: aRMSE {ev['armse']:.4f} ± {ev['armse_ci']:.4f} ({ev['trajectories']} trajectories × {ev['cycles']} cycles)")
    return 0


def cmd_reproduce(a) -> int:
    from danlab.experiments import reproduce as rp
    out = Path(a.out) if a.out else _default_out(f"reproduce-{a.what}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.what == "table":
        rp.reproduce_table(a.quick, out, threads=a.threads)
        print((out / "table.md").read_text())
    else:
        rp.reproduce_transfer(out, a.quick, weights=a.weights, threads=a.threads)
        print((out / "transfer.md").read_text())
    print(f"results in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danlab", description="Learned and classical data assimilation on chaotic dynamics")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, config=True):
        if config:
            sp.add_argument("config", help="YAML config")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. filter.N=40")
        sp.add_argument("--out", help="run folder (default: runs/<kind>-<time>)")
        sp.add_argument("--json", action="store_true", help="print the summary as one JSON line")
        sp.add_argument("--progress", action="store_true", help="show a progress bar")

    sp = sub.add_parser("run", help="run one twin experiment")
    common(sp)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("tune", help="grid-search hyperparameters (batched) and report the best aRMSE")
    common(sp)
    sp.add_argument("--grid", action="append", required=True, metavar="NAME=start:stop:step",
                    help="a grid axis: NAME=start:stop:step (stop included) or NAME=v1,v2,...; NAME without a dot means filter.NAME")
    sp.set_defaults(fn=cmd_tune)

    sp = sub.add_parser("train", help="train a learned analysis a_theta")
    sp.add_argument("config", nargs="?", help="training YAML config")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--out", help="run folder (default: runs/train-<time>)")
    sp.add_argument("--stop-after", type=int, default=None, metavar="K", help="stop (with a checkpoint) after K more steps")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("eval", help="evaluate a trained network as a filter (same summary as `run`)")
    sp.add_argument("checkpoint", help="network folder (model.json) or training run folder")
    sp.add_argument("--nx", type=int, help="state size (default: the training one)")
    sp.add_argument("--N", type=int, help="ensemble size (default: the training one)")
    sp.add_argument("--cycles", type=int, default=10_000)
    sp.add_argument("--burn-in", type=int, default=500)
    sp.add_argument("--batch", type=int, default=8, help="independent trajectories")
    sp.add_argument("--seed", type=int, default=0)
    common(sp, config=False)
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("sweep", help="run a sweep file's points as independent tasks on Dask")
    sp.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sp.add_argument("--scheduler", help="an existing Dask scheduler address (tcp://...), or 'synchronous'; default: a LocalCluster")
    sp.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    sp.add_argument("--budget", help="which of the sweep's budgets (default: reduced, if defined)")
    sp.add_argument("--threads", type=int, default=1, help="PyTorch threads per task")
    sp.add_argument("--out", help="parent folder (default: runs/sweeps)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("export", help="ship a training run's best network as weights with provenance")
    sp.add_argument("run_dir")
    sp.add_argument("dest", help="e.g. weights/l96_nf40_ne1")
    sp.add_argument("--cycles", type=int, default=10_000)
    sp.add_argument("--burn-in", type=int, default=500)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("reproduce", help="reproduce the reference results (table, transfer)")
    sp.add_argument("what", choices=["table", "transfer"])
    sp.add_argument("--quick", action="store_true", help="fewer cycles (table: < 10 min on 2 cores)")
    sp.add_argument("--out", help="run folder (default: runs/reproduce-<what>-<time>)")
    sp.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    sp.add_argument("--weights", default="l96_nf40_ne1", help="transfer: the weights (folder under weights/ or a path)")
    sp.set_defaults(fn=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as exc:
        print(f"danlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
