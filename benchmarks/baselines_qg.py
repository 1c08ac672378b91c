"""QG on the sphere (T21, Nx 2048, Δt 6 h, 256 random grid points observed per cycle, σ 1): the classical baselines.

    python benchmarks/baselines_qg.py [--only TEXT] [--cycles 2200] [--burn-in 200] [--experiments 2]
                                      [--tune-cycles 600] [--tuned-from JSON] [--stem qg_baselines]
        -> docs/results/{stem}.{md,json}: aRMSE ± CI of each method at its tuned hyperparameters

Protocol as baselines_ks.py and baselines_l96.py: each grid tuned by one batched run on seed 1, the best value
scored on seed 0. The global ensemble filters are left out: with N 20 the EnKF-N loses the truth within ~90
cycles on this twin (docs/results/qg_baselines.md), the sign that localisation is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TABLE_PROTOCOL, baseline_table, merge_rows, score_methods  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "qg"

# name, config file, overrides, tuning grids (none: no tuning), published score (none for this setup)
METHODS = [
    ("LETKF, N=20, tuned radius (km) and inflation", "letkf.yaml", ["filter.N=20"],
     ["radius=3000,4000,6000,9000", "infl=1.0,1.02,1.05,1.1"], "—"),  # best 6000 km, 1.05 (docs/results/qg_baselines.md)
    ("local EnKF-N, N=20, xN=1, radius of the LETKF", "letkf.yaml",
     ["filter.N=20", "filter.prior=N", "filter.infl=1.0", "filter.xN=1"], [], "—"),
    ("3D-Var, tuned B scale", "var3d.yaml", [], ["scale=0.02,0.03,0.05,0.07,0.1"], "—"),  # 0.03 of 0.03..0.3 (300 cycles), 0.05 of 0.01..0.05 (600)
]

INTRO = ("# Classical baselines, QG on the sphere (T21, 32 × 64 Gaussian grid, Nx 2048, RK4 dt 1 h, Δt 6 h, "
         "256 random grid points observed per cycle, σ 1)\n\n" + TABLE_PROTOCOL
         + "The LETKF's radius is the Gaspari–Cohn half-width in great-circle km (zero beyond twice it), its local "
         "analyses in blocks of 4 grid points along a latitude row. The climatological std of the state is 9.6 "
         "(docs/results/qg_model.md): a filter that has lost the truth scores about 1.4 × that.\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only the methods whose name contains this text, or one of the texts "
                    "separated by | (their rows replace those of the same name in the existing table)")
    ap.add_argument("--cycles", type=int, default=2200, help="cycles of each scored experiment")
    ap.add_argument("--experiments", type=int, default=2, help="scored experiments")
    ap.add_argument("--burn-in", type=int, default=200, help="cycles not scored")
    ap.add_argument("--tune-cycles", type=int, default=600, help="cycles of each tuning experiment")
    ap.add_argument("--tuned-from", help="take the tuned values from this earlier JSON instead of tuning")
    ap.add_argument("--radius-from", help="JSON whose tuned LETKF radius the local EnKF-N takes (default: this run's)")
    ap.add_argument("--stem", default="qg_baselines")
    ap.add_argument("--note", default="", help="a paragraph appended to the table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = dict(cycles=a.cycles, exps=a.experiments, burn=a.burn_in, tune_cycles=a.tune_cycles,
                  tune_burn=a.tune_cycles // 4, tune_exps=1)
    letkf = [m for m in METHODS if m[0].startswith("LETKF")]
    rows = score_methods(letkf, CFG, a, **budget)
    tuned = rows + (json.loads(Path(a.radius_from).read_text()) if a.radius_from else [])
    radius = next((r["tuned"] for r in tuned if r["method"] == letkf[0][0]), None)
    radius = radius and [kv.split("=")[1] for kv in radius.split(", ") if kv.startswith("radius=")]
    methods = []
    for name, file, over, grids, target in METHODS[1:]:
        if name.startswith("local EnKF-N"):
            if not radius:
                continue  # the LETKF was not tuned in this run: give --radius-from
            name, over = name.replace("radius of the LETKF", f"radius {radius[0]}"), over + [f"filter.radius={radius[0]}"]
        methods.append((name, file, over, grids, target))
    rows += score_methods(methods, CFG, a, **budget)
    if (out / f"{a.stem}.json").is_file():  # keep the other methods' rows
        old = json.loads((out / f"{a.stem}.json").read_text())
        rows = merge_rows(old, rows, list(dict.fromkeys([r["method"] for r in old + rows])))
    baseline_table(rows, out, a.stem, INTRO, a.note)


if __name__ == "__main__":
    main()
