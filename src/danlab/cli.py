"""`danlab` command line: run, tune, train, eval (and the reproduction harness).

Every command exits with status 2 and one line `danlab: error: ...` on a bad config, a missing file or
an unusable checkpoint, never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from danlab.config import ConfigError, load_config
from danlab.io import OutputError, check_output_dir
from danlab.checkpoint import CheckpointError


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _progress(a) -> bool:
    """A progress bar by default when stderr is a terminal; --quiet turns it off, --progress forces it on."""
    return not a.quiet and (a.progress or sys.stderr.isatty())


def _print_summary(summary: dict, as_json: bool) -> None:
    from danlab.experiments.runner import format_score
    s = {k: v for k, v in summary.items() if k != "table"}
    if as_json:
        print(json.dumps(s, default=str))
        return
    for p in summary.get("table", []):
        cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items() if k in s.get("grid", {})]
        cells.append(f"armse={format_score(p, partial=True)}")
        print("  " + "  ".join(cells))
    line = f"{s['method']}: aRMSE {format_score(s)}"
    if s.get("best"):
        line += f" at {s['best']}"
    if "spread" in s and math.isfinite(s["spread"]):
        line += f", spread {s['spread']:.4f}"
        if math.isfinite(s.get("spread_ratio", math.nan)):
            line += f" ({s['spread_ratio']:.2f} x aRMSE)"
        if "perturb" in s:  # a learned ensemble: the observation perturbation its spread came from
            line += f" with perturbation {s['perturb']:g}"
        if "control" in s:  # recentred on a single-state network's analysis: the mean is that control
            line += f", recentred on {s['control']}"
    if s.get("armse_s") is not None and math.isfinite(s["armse_s"]):
        line += f", smoothed {s['armse_s']:.4f} ± {s['armse_s_ci']:.4f}"
    n_div = s.get("n_diverged")
    line += f", {s['cycles_per_s']:.0f} cycles/s" + (
        "" if not s.get("diverged") else f", {n_div} of {s['experiments']} experiments DIVERGED"
        if n_div and math.isfinite(s["armse"]) else ", DIVERGED")
    print(line)
    if "out" in s:
        print(f"results in {s['out']}")


def cmd_run(a) -> int:
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import run_experiment
    cfg = load_config(RunConfig, a.config, a.set)
    out = check_output_dir(a.out or _default_out(cfg.filter.method))
    _print_summary(run_experiment(cfg, out, progress=_progress(a)), a.json)
    return 0


def cmd_tune(a) -> int:
    from danlab.experiments.run_config import RunConfig
    from danlab.experiments.runner import parse_grid, tune
    cfg = load_config(RunConfig, a.config, a.set)
    grids = [parse_grid(g) for g in a.grid]
    out = check_output_dir(a.out or _default_out(f"tune-{cfg.filter.method}"))
    _print_summary(tune(cfg, grids, out, progress=_progress(a)), a.json)
    return 0


def cmd_train(a) -> int:
    from danlab.training.train_config import TrainRunConfig
    from danlab.training.trainer import train
    if a.resume:
        run_dir = Path(a.resume)
        if not (run_dir / "checkpoint.json").is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a training run folder (no checkpoint.json and config.yaml "
                              "there); give the --out folder of a `danlab train` run")
        cfg = load_config(TrainRunConfig, run_dir / "config.yaml", a.set, stored=True)
    else:
        if not a.config:
            raise ConfigError("train: give a CONFIG.yaml, or --resume RUN_DIR")
        cfg = load_config(TrainRunConfig, a.config, a.set)
        run_dir = Path(a.out) if a.out else _default_out("train")
    check_output_dir(run_dir, "--resume" if a.resume else "--out")
    from danlab.resources import check_train_memory
    check_train_memory(cfg)
    result = train(cfg, run_dir, resume=bool(a.resume), stop_after=a.stop_after, progress=not a.quiet)
    print(json.dumps(result | {"run_dir": str(run_dir)}))
    return 0


def cmd_eval(a) -> int:
    from danlab.experiments.run_config import RunConfig, learned_eval_data
    from danlab.experiments.runner import run_experiment
    from danlab.learned import load_net, resolve_net_dir
    _, meta = load_net(a.checkpoint)
    data = learned_eval_data(meta.get("trained_with", {}), resolve_net_dir(a.checkpoint), seed=a.seed, cycles=a.cycles,
                             burn_in=a.burn_in, batch=a.batch, Nx=a.nx, N=a.N)
    cfg = load_config(RunConfig, None, a.set, data=data)
    out = check_output_dir(a.out or _default_out("eval"))
    _print_summary(run_experiment(cfg, out, progress=_progress(a)), a.json)
    return 0


def cmd_calibrate(a) -> int:
    from danlab.experiments.calibrate import calibrate
    from danlab.experiments.runner import format_score, parse_grid
    name, values = parse_grid(a.grid if "=" in a.grid else f"perturb={a.grid}")
    if name != "filter.perturb":
        raise ConfigError(f"calibrate --grid {a.grid}: only the perturbation is calibrated (perturb=start:stop:step)")
    if a.write and not a.force and a.seed == 0:
        raise ConfigError("calibrate --write: seed 0 is the one every evaluation scores on; calibrate on another "
                          "(--seed 7, the default) or pass --force")
    r = calibrate(a.checkpoint, values, N=a.N, cycles=a.cycles, burn_in=a.burn_in, batch=a.batch, seed=a.seed,
                  overrides=a.set, out=a.out, write=a.write, progress=_progress(a))  # tune() checks --out first
    if a.json:
        print(json.dumps(r, default=str))
        return 0
    for p in r["grid"]:
        print(f"  perturb={p['perturb']:.4g}  armse={format_score(p | {'experiments': a.batch})}  "
              f"spread/aRMSE {p['spread_ratio']:.3f}" + (f"  ({p['n_diverged']} diverged)" if p["n_diverged"] else ""))
    print(f"perturb {r['perturb']:.4g}: spread / aRMSE {r['spread_ratio']:.3f} (calibrated: {r['target_ratio']:.3f} for "
          f"N = {r['N']}), aRMSE {r['armse']:.4f} ± {r['armse_ci']:.4f} on seed {r['seed']}"
          + ("; at the edge of the grid: widen it" if r["on_edge"] else ""))
    print(f"recorded in {r['checkpoint']}/model.json" if r["written"] else "not recorded (--write records it in the sidecar)")
    return 0


def cmd_sweep(a) -> int:
    from danlab.experiments.sweep import run_sweep
    check_output_dir(a.out or "runs/sweeps")
    r = run_sweep(a.sweep, out=a.out or "runs/sweeps", scheduler=a.scheduler, workers=a.workers,
                  budget=a.budget, threads=a.threads, progress=not a.quiet, only=a.only)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k != "dataset"}, default=str))
    else:
        print(f"{r['name']}: {r['points']} points, {r['done']} done, {r['skipped']} skipped, {len(r['failed'])} failed"
              + (f", {r['not_run']} not run (--only)" if r["not_run"] else "") + f"; results in {r['results']}")
    return 1 if r["failed"] else 0


def cmd_export(a) -> int:
    from danlab.experiments.runner import format_score
    from danlab.experiments.export import export
    prov = export(a.run_dir, a.dest, cycles=a.cycles, burn_in=a.burn_in, batch=a.batch, seed=a.seed)
    ev = prov["evaluation"]
    print(f"{a.dest}: aRMSE {format_score(ev | {'experiments': ev['trajectories']})} "
          f"({ev['trajectories']} trajectories × {ev['cycles']} cycles)")
    return 0


def cmd_reproduce(a) -> int:
    from danlab.experiments import reproduce as rp
    models = {"table": ("l96", "ks", "qg"), "transfer": ("l96", "ks")}.get(a.what, ("l96",))
    if a.model not in models:
        raise ConfigError(f"reproduce {a.what}: --model {a.model} is not available (it runs on {', '.join(models)})")
    if a.weights and a.what in ("table", "nonlinearity"):
        raise ConfigError(f"reproduce {a.what}: --weights is not used (its networks are fixed: the shipped weights/ of "
                          "each row)")
    rp.check_layout(a.model)
    out = check_output_dir(Path(a.out) if a.out else _default_out(f"reproduce-{a.what}" + (f"-{a.model}" if a.model != "l96" else "")))
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.what == "table":
        rp.reproduce_table(a.quick, out, threads=a.threads, model=a.model)
        print((out / "table.md").read_text())
    elif a.what == "sparsity":
        rp.reproduce_sparsity(out, a.quick, weights=a.weights or "l96_nf40_sparse", threads=a.threads)
        print((out / "sparsity.md").read_text())
    elif a.what == "nonlinearity":
        rp.reproduce_nonlinearity(out, a.quick, threads=a.threads)
        print((out / "nonlinearity.md").read_text())
    elif a.what == "window":
        rp.reproduce_window(out, a.quick, weights=a.weights or "l96_nf40_ne1", threads=a.threads)
        print((out / "window.md").read_text())
    else:
        rp.reproduce_transfer(out, a.quick, weights=a.weights or {"l96": "l96_nf40_ne1", "ks": "ks_ne1"}[a.model],
                              threads=a.threads, model=a.model)
        print((out / "transfer.md").read_text())
    print(f"results in {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line `danlab: error: ...` and exit 2, like every other error."""

    def error(self, message):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"danlab: error: {where}{message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo} (got {v})")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


POSITIVE, NONNEG = _int_at_least(1), _int_at_least(0)


def cmd_config(a) -> int:
    from danlab.configdoc import show
    print(show(a.config, a.set, kind=a.kind))
    return 0


def cmd_analyse(a) -> int:
    from danlab.diagnostics.run import analyse_command
    summary = analyse_command(a)
    if a.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"b {summary['b']:.2e}, s {summary['s']:.2e}; P^a least squares vs Jacobian {summary['pa_ls_vs_jacobian']:.3f}; "
              f"eigenvalue ratio a_θ/EnKF-N, modes 1-10: {', '.join(f'{r:.2f}' for r in summary['eig_ratio'])}; "
              f"sensitivity extent {summary['sensitivity_extent']} sites; {summary['lyapunov_positive']} positive Lyapunov "
              f"exponents; alignment cosine {summary['alignment_cos']:.3f} (EnKF-N {summary['alignment_cos_enkf']:.3f})")
        print(f"results in {summary['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="danlab", description="Learned and classical data assimilation on chaotic dynamics")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, config=True):
        if config:
            sp.add_argument("config", help="YAML config")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. filter.N=40")
        sp.add_argument("--out", help="run folder (default: runs/<kind>-<time>)")
        sp.add_argument("--json", action="store_true", help="print the summary as one JSON line")
        sp.add_argument("--progress", action="store_true", help="show a progress bar (default: when stderr is a terminal)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

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
    sp.add_argument("--stop-after", type=POSITIVE, default=None, metavar="K", help="stop (with a checkpoint) after K more steps")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("eval", help="evaluate a trained network as a filter (same summary as `run`)")
    sp.add_argument("checkpoint", help="network folder (model.json) or training run folder")
    sp.add_argument("--nx", type=int, help="state size (default: the training one; a Kuramoto–Sivashinsky domain keeps its grid spacing, its length scales with Nx)")
    sp.add_argument("--N", type=int, help="ensemble size (default: the training one)")
    sp.add_argument("--cycles", type=int, default=10_000)
    sp.add_argument("--burn-in", type=NONNEG, default=500)
    sp.add_argument("--batch", type=int, default=8, help="independent trajectories")
    sp.add_argument("--seed", type=int, default=0)
    common(sp, config=False)
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("calibrate", help="choose a learned ensemble's observation perturbation so that its spread "
                        "matches its error (on a seed other than the scored one)")
    sp.add_argument("checkpoint", help="network folder (model.json) or training run folder")
    sp.add_argument("--grid", default="0.3:1.0:0.05", metavar="START:STOP:STEP",
                    help="perturbations to try: start:stop:step (stop included) or v1,v2,... (default 0.3:1.0:0.05)")
    sp.add_argument("--N", type=int, help="ensemble size (default: the training one; must be >= 2)")
    sp.add_argument("--cycles", type=int, default=2000)
    sp.add_argument("--burn-in", type=NONNEG, default=300)
    sp.add_argument("--batch", type=int, default=4, help="independent trajectories")
    sp.add_argument("--seed", type=int, default=7, help="held-out trajectories of this seed (not 0, the scored one)")
    sp.add_argument("--write", action="store_true", help="record the choice in the network's sidecar (model.json), "
                    "where it becomes the default perturbation for this N")
    sp.add_argument("--force", action="store_true", help="--write even when calibrating on seed 0")
    common(sp, config=False)
    sp.set_defaults(fn=cmd_calibrate)

    sp = sub.add_parser("sweep", help="run a sweep file's points as independent tasks on Dask")
    sp.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sp.add_argument("--scheduler", help="an existing Dask scheduler address (tcp://...), or 'synchronous'; default: a LocalCluster")
    sp.add_argument("--workers", type=POSITIVE, default=2, help="LocalCluster workers")
    sp.add_argument("--budget", help="which of the sweep's budgets (default: reduced, if defined)")
    sp.add_argument("--threads", type=POSITIVE, default=1, help="PyTorch threads per task")
    sp.add_argument("--out", help="parent folder (default: runs/sweeps)")
    sp.add_argument("--only", action="append", metavar="AXIS=VALUE",
                    help="run only the points with this value on this axis (repeatable: values of one axis are "
                         "alternatives, axes combine); the points finished before are gathered all the same")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("export", help="ship a training run's best network as weights with provenance")
    sp.add_argument("run_dir")
    sp.add_argument("dest", help="e.g. weights/l96_nf40_ne1")
    sp.add_argument("--cycles", type=int, default=10_000)
    sp.add_argument("--burn-in", type=NONNEG, default=500)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("reproduce", help="reproduce the reference results (table, transfer, window, sparsity, "
                        "nonlinearity)")
    sp.add_argument("what", choices=["table", "transfer", "window", "sparsity", "nonlinearity"])
    sp.add_argument("--quick", action="store_true", help="fewer cycles (table: < 10 min on 2 cores)")
    sp.add_argument("--model", choices=["l96", "ks", "qg"], default="l96",
                    help="table, transfer: the twin (l96: Lorenz 96, the reference paper's; ks: Kuramoto–Sivashinsky "
                    "(transfer: domain lengths × 0.5, 1, 2 at the trained resolution); qg: quasi-geostrophic on the sphere, "
                    "table only)")
    sp.add_argument("--out", help="run folder (default: runs/reproduce-<what>-<time>)")
    sp.add_argument("--threads", type=POSITIVE, help="CPU threads for PyTorch")
    sp.add_argument("--weights", help="transfer, window (default l96_nf40_ne1; transfer --model ks: ks_ne1), sparsity "
                    "(default l96_nf40_sparse): the weights (folder under weights/ or a path); refused by table and nonlinearity, "
                    "whose rows name their own")
    sp.set_defaults(fn=cmd_reproduce)

    sp = sub.add_parser("config", help="list the config keys: type, default and description of each")
    csub = sp.add_subparsers(dest="action", required=True)
    cs = csub.add_parser("show", help="every key of a run (or training) config with its type, default, description; "
                                      "with CONFIG, its value there too")
    cs.add_argument("config", nargs="?", help="a YAML config (run or training) to show the resolved values of")
    cs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override, as in run/train")
    cs.add_argument("--kind", choices=["run", "train"], help="which config (default: guessed from CONFIG, else both)")
    cs.set_defaults(fn=cmd_config)

    sp = sub.add_parser("analyse", help="explain what a trained a_theta learned (operator expansion, spectra, sensitivity, Lyapunov)")
    sp.add_argument("weights", help="network folder, training run folder, or a name under weights/")
    sp.add_argument("--cycles", help="cycles of the twin (default 10000; --quick 2000)")
    sp.add_argument("--burn-in", help="cycles before the statistics (default 1000)")
    sp.add_argument("--seed", default="0")
    sp.add_argument("--nx", help="state size (default: the training one)")
    sp.add_argument("--np", help="N_p, sampled innovations of the least-squares P^a (default 400; --quick 200)")
    sp.add_argument("--innovation-scale", help="the sampled innovations are N(0, scale^2 R) (default 1)")
    sp.add_argument("--snapshots", help="cycles at which P^a is estimated (default 200; --quick 30)")
    sp.add_argument("--threads", help="CPU threads for PyTorch")
    sp.add_argument("--quick", action="store_true", help="a small budget (<= 2 min on 2 cores)")
    sp.add_argument("--out", help="folder (default: runs/analyse-<time>)")
    sp.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    sp.set_defaults(fn=cmd_analyse)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, OutputError) as exc:
        print(f"danlab: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("danlab: error: out of memory (lower the ensemble size, the state size, the batch or the cycles)",
              file=sys.stderr)
        return 2
    except RuntimeError as exc:  # an allocation the memory estimate did not foresee: still one line
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        print(f"danlab: error: out of memory ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
