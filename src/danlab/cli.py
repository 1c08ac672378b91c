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

from danlab.config import ConfigError, load_config, to_yaml
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
    if a.resume and a.set:
        from danlab.io import atomic_write_text
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    print(json.dumps(result | {"run_dir": str(run_dir)}))
    return 0


def cmd_eval(a) -> int:
    from danlab.experiments.config import RunConfig
    from danlab.experiments.runner import run_experiment
    from danlab.learned import load_net, resolve_net_dir
    _, meta = load_net(a.checkpoint)
    trained = meta.get("trained_with", {})
    data = {"seed": a.seed, "cycles": a.cycles, "burn_in": min(a.burn_in, a.cycles - 1), "batch": a.batch,
            "model": dict(trained.get("model", {})), "observations": dict(trained.get("observations", {})),
            "filter": {"method": "learned", "checkpoint": str(resolve_net_dir(a.checkpoint)),
                       "N": a.N or trained.get("train", {}).get("Ne", 1)}}
    if a.nx:
        data["model"]["Nx"] = a.nx
    cfg = load_config(RunConfig, None, a.set, data=data)
    out = a.out or _default_out("eval")
    _print_summary(run_experiment(cfg, out, progress=a.progress), a.json)
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
