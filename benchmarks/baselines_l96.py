"""Classical baselines on the standard Lorenz 96 twin: accuracy (aRMSE ± CI over >= 10,000 cycles after
burn-in) of each method at its best-tuned hyperparameter, and speed (cycles/s for one experiment,
experiment-cycles/s for a batch of 64).

Protocol: hyperparameters are tuned by one batched grid run on tuning seeds (seed 1), then the best value
is evaluated on other seeds (seed 0), so the reported score carries no selection bias.

    python benchmarks/baselines_l96.py [--quick] [--threads 2]

writes docs/results/baselines_l96.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, merge_rows, provenance, score_methods  # noqa: E402

from danlab.config import load_config  # noqa: E402
from danlab.experiments.run_config import RunConfig  # noqa: E402
from danlab.experiments.runner import run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "l96"

VAR4D_SCALES = "0.003,0.005,0.0075,0.01,0.015,0.02,0.04"

# name, config file, overrides, tuning grids, target from the issue / literature
METHODS = [
    ("EnKF-N, N=20, xN=2", "enkf_n.yaml", ["filter.N=20", "filter.xN=2"], [], "0.19 ± 0.01"),
    ("EnKF-N, N=40, xN=2", "enkf_n.yaml", ["filter.N=40", "filter.xN=2"], [], "0.18 ± 0.01"),
    ("EnKF-N, N=20, xN=1", "enkf_n.yaml", ["filter.N=20", "filter.xN=1"], [], "—"),
    ("ETKF, N=20, tuned inflation", "etkf.yaml", ["filter.N=20"], ["infl=1.00:1.10:0.01"], "≤ 0.20"),
    ("EnKF (perturbed obs), N=20, tuned inflation", "enkf.yaml", ["filter.N=20"], ["infl=1.00:1.30:0.03"], "—"),
    ("IEnKF, N=20, EnKF-N prior, tuned xN", "ienkf.yaml", ["filter.N=20", "filter.prior=N", "filter.infl=1.0"],
     ["xN=1,1.5,2,3,4"], "≤ 0.18"),
    ("IEnKF, N=20, tuned inflation", "ienkf.yaml", ["filter.N=20", "filter.prior=infl"], ["infl=1.000:1.040:0.005"], "≤ 0.18"),
    ("3D-Var, tuned B scale", "var3d.yaml", [], ["scale=0.01,0.015,0.02,0.025,0.03,0.04,0.05,0.07,0.1"], "0.40 ± 0.02"),
    ("IEnKS, N=20, lag 1, EnKF-N prior xN=2", "ienks.yaml", ["filter.N=20", "filter.lag=1", "filter.xN=2"], [],
     "0.174 ± 0.005"),
    ("IEnKS, N=20, lag 5, EnKF-N prior xN=2", "ienks.yaml", ["filter.N=20", "filter.lag=5", "filter.xN=2"], [],
     "≤ lag 1"),
    ("4D-Var, lag 1, tuned B scale", "var4d.yaml", ["filter.lag=1"], [f"scale={VAR4D_SCALES}"], "≈ 0.41 (3D-Var)"),
    ("4D-Var, lag 5, tuned B scale", "var4d.yaml", ["filter.lag=5"], [f"scale={VAR4D_SCALES}"], "< lag 1"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test, not the reference figures)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--only", help="run only the methods whose name contains this text, or one of the texts "
                    "separated by | (their rows replace those of the same name in the existing table, the others are kept)")
    ap.add_argument("--tuned-from", help="take the tuned values from this earlier JSON instead of tuning")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cycles, burn, exps = (2_500, 500, 2) if a.quick else (10_500, 500, 4)
    tune_cycles, tune_exps = (1_000, 2) if a.quick else (3_000, 4)
    def speed(file: str, fixed: list[str]) -> dict:  # one experiment alone, and a batch of 64
        one = run_experiment(load_config(RunConfig, CFG / file, fixed + ["cycles=1000", "burn_in=100", "batch=1", "seed=2"]), None)
        b64 = run_experiment(load_config(RunConfig, CFG / file, fixed + ["cycles=300", "burn_in=50", "batch=64", "seed=3"]), None)
        return {"cycles_per_s_B1": one["cycles_per_s"], "exp_cycles_per_s_B64": b64["experiment_cycles_per_s"]}

    rows = score_methods(METHODS, CFG, a, cycles=cycles, exps=exps, burn=burn, tune_cycles=tune_cycles,
                         tune_burn=min(500, tune_cycles // 3), tune_exps=tune_exps, extra=speed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "baselines_l96" + ("_quick" if a.quick else "")
    if a.only and (out / f"{stem}.json").is_file():  # keep the other methods' rows, in the order of METHODS
        rows = merge_rows(json.loads((out / f"{stem}.json").read_text()), rows, [m for m, *_ in METHODS])
    pd.DataFrame([{k: v for k, v in r.items() if k != "rank_hist"} for r in rows]).to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown_table(
        ["method", "tuned", "aRMSE ± 95% CI", "target", "smoothed aRMSE", "spread", "cycles/s (B=1)",
         "exp-cycles/s (B=64)"],
        [[r["method"], r["tuned"], f"{r['armse']:.3f} ± {r['armse_ci']:.3f}", r["target"],
          f"{r['armse_s']:.3f} ± {r['armse_s_ci']:.3f}" if math.isfinite(r.get("armse_s", math.nan)) else "—",
          f"{r['spread']:.3f}",
          f"{r['cycles_per_s_B1']:.0f}", f"{r['exp_cycles_per_s_B64']:.0f}"] for r in rows])
    text = (f"# Classical baselines, Lorenz 96 (Nx 40, F 8, Δt 0.05, H = I, R = I)\n\n"
            f"Produced by `{command_line()}` ({provenance()}).\n\n"
            f"aRMSE: mean over {exps} experiments of the time mean of the analysis RMSE over {cycles - burn} cycles after "
            f"{burn} cycles of burn-in; the 95% interval is corrected for autocorrelation. Hyperparameters tuned on "
            f"seed 1 ({tune_exps} experiments × {tune_cycles} cycles), scored on seed 0. Smoothed aRMSE: a smoother's "
            f"(IEnKS, 4D-Var) estimate at the start of its window of L cycles, given the observations up to its end."
            + (f" Only the rows matching `{a.only}` come from this command; the others are kept from earlier runs of "
               "this script (see the git history of this file)." if a.only else "") + "\n\n" + table)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
