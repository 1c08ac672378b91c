"""Calibration of learned and classical ensembles on the standard Lorenz 96 twin (issue 15): aRMSE of the mean,
mean spread, spread / aRMSE, and the rank histogram of the truth among the analysis members (over the scored
cycles and every site), for learned networks run as ensembles (Ne members, with the observation perturbations
they were trained with unless --set says otherwise) beside the EnKF-N and the ETKF.

    python benchmarks/calibration.py --net weights/l96_nf40_ne10 [--net weights/l96_nf40_ne1:N=10,perturb=1]
        [--cycles 10000 --burn-in 500 --batch 8] [--threads 2] [--quick] [--keep-classical]
        [--out docs/results/calibration]

A --net is PATH[:key=value,...] with keys N (the ensemble size, default the trained one), perturb (the
filter's observation perturbation, default the trained one) and control (a single-state network the ensemble is
recentred on at every cycle: `Learned.control`). Classical rows: EnKF-N (xN 2, no tuning) at N = 10, 20,
and the ETKF (N 20) with its inflation tuned on seed 1; every row scored on seed 0. Writes
{out}.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, provenance, score_methods  # noqa: E402

from danlab.config import load_config  # noqa: E402
from danlab.experiments.run_config import RunConfig, learned_eval_data  # noqa: E402
from danlab.experiments.runner import format_score, run_experiment  # noqa: E402
from danlab.learned import calibrated_perturb, default_perturb, load_net, resolve_net_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSICAL = [
    ("EnKF-N, N=10, xN=2", "enkf_n.yaml", ["filter.N=10", "filter.xN=2"], [], "—"),
    ("EnKF-N, N=20, xN=2", "enkf_n.yaml", ["filter.N=20", "filter.xN=2"], [], "—"),
    ("ETKF, N=20", "etkf.yaml", ["filter.N=20"], ["filter.infl=1.0:1.1:0.01"], "—"),
]


def learned_row(spec: str, a) -> dict:
    path, _, opts = spec.partition(":")
    kw = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    _, meta = load_net(path)
    trained = meta.get("trained_with", {})
    N = int(kw.get("N", trained.get("train", {}).get("N", 1)))
    data = learned_eval_data(trained, resolve_net_dir(path), seed=0, cycles=a.cycles, burn_in=a.burn_in,
                             batch=a.batch, N=N)
    over = ([f"threads={a.threads}"] + ([f"filter.perturb={kw['perturb']}"] if "perturb" in kw else [])
            + ([f"filter.control={kw['control']}"] if "control" in kw else []))
    cfg = load_config(RunConfig, None, over, data=data)
    s = run_experiment(cfg, None)
    t = trained.get("train", {})
    perturb = cfg.filter.perturb if cfg.filter.perturb is not None else default_perturb(meta, N, path)
    how = ("given" if cfg.filter.perturb is not None else
           "calibrated" if calibrated_perturb(meta, N, path) is not None else "as trained")
    name = (f"a_θ {Path(path).name}, Ne={N}, perturb={perturb:g} ({how})"
            + (f", recentred on {Path(kw['control']).name}" if "control" in kw else "")
            + f" (trained: loss {t.get('loss', 'supervised')}, Ne {t.get('N', 1)}, perturb {t.get('perturb_obs', 0):g})")
    row = {"method": name, "tuned": "—", "armse": s["armse"], "armse_ci": s["armse_ci"], "spread": s["spread"],
           "spread_ratio": s["spread_ratio"], "rank_hist": s.get("rank_hist"), "diverged": s["n_diverged"],
           "scored": f"{a.batch} × {a.cycles - a.burn_in} after {a.burn_in}", "command": command_line(),
           "code": provenance()}
    print(f"{name}: aRMSE {s['armse']:.4f} ± {s['armse_ci']:.4f}, spread {s['spread']:.4f} "
          f"(ratio {s['spread_ratio']:.3f})", flush=True)
    return row


def outside(hist: list[float] | None) -> float:
    """The share of truths outside the ensemble (rank 0 or N), against 2 / (N + 1) for a calibrated one."""
    return float("nan") if not hist else hist[0] + hist[-1]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("rank_hist")]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 2.8), squeeze=False)
    for ax, r in zip(axes[0], rows):
        h = r["rank_hist"]
        ax.bar(range(len(h)), [v * len(h) for v in h], width=0.9)  # 1 = flat
        ax.axhline(1, color="k", lw=0.6, ls=":")
        title = r["method"].split(" (trained")[0].replace(", recentred", "\nrecentred")
        ax.set_title(f"{title}\nspread/aRMSE {r['spread_ratio']:.2f}", fontsize=7)
        ax.set_xlabel("rank of the truth")
    axes[0][0].set_ylabel("frequency × (N + 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", action="append", default=[], help="PATH[:N=..,perturb=..] of a learned network")
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--burn-in", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1,000 cycles, 2 experiments, coarse tuning: a smoke run")
    ap.add_argument("--no-classical", action="store_true")
    ap.add_argument("--keep-classical", action="store_true", help="take the classical rows from the existing "
                    "{out}.json (each keeps the command and code that made it) instead of running them again")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "calibration"))
    a = ap.parse_args(argv)
    if a.quick:
        a.cycles, a.burn_in, a.batch = 1000, 200, 2
    torch.set_num_threads(a.threads)
    rows = [learned_row(spec, a) for spec in a.net]
    out = Path(a.out)
    if a.keep_classical:
        old = json.loads(out.with_suffix(".json").read_text())
        rows += [r for r in old if any(r["method"] == m[0] for m in CLASSICAL)]
    elif not a.no_classical:
        a.only, a.tuned_from = None, None
        rows += score_methods(CLASSICAL, ROOT / "configs" / "l96", a, cycles=a.cycles, exps=a.batch, burn=a.burn_in,
                              tune_cycles=min(a.cycles, 3000), tune_burn=min(a.burn_in, 500), tune_exps=a.batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown_table(
        ["method", "tuned", "aRMSE ± 95% CI", "spread", "spread / aRMSE", "truth outside the ensemble (calibrated)",
         "scored", "diverged"],
        [[r["method"], r["tuned"], format_score({**r, "n_diverged": r["diverged"], "experiments": a.batch}),
          "—" if math.isnan(r["spread"]) else f"{r['spread']:.4f}",
          "—" if math.isnan(r.get("spread_ratio", math.nan)) else f"{r['spread_ratio']:.3f}",
          f"{outside(r.get('rank_hist')):.3f} ({2 / len(r['rank_hist']):.3f})" if r.get("rank_hist") else "—",
          r["scored"], r["diverged"]] for r in rows])
    commands = list(dict.fromkeys(r["command"] for r in rows))
    text = ("# Calibration of learned and classical ensembles (L96 standard, Nx 40, H = I, R = I)\n\n"
            "Spread: sqrt of the site-mean analysis ensemble variance (N - 1 normalised), averaged over the scored "
            "cycles; spread / aRMSE near 1 for an ensemble that knows its error. Rank histograms of the truth among "
            "the analysis members over every scored cycle and site in "
            f"[{out.with_suffix('.png').name}]({out.with_suffix('.png').name}); the share of truths outside the "
            "ensemble is 2 / (N + 1) for a calibrated one.\n\n" + table + "\nMade by:\n\n"
            + "".join(f"{i + 1}. `{c}` ({next(r['code'] for r in rows if r['command'] == c)})\n"
                      for i, c in enumerate(commands)))
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
