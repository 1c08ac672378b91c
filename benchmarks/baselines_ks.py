"""Kuramoto–Sivashinsky (Nx 128, length 32π, ETDRK4 dt 0.5, Δt 1, H = I, R = I): the model's validation and the
classical baselines.

    python benchmarks/baselines_ks.py model [--cycles 1500] [--trajectories 4]
        -> docs/results/ks_model.{md,json,png}: ETDRK4 against the independent reference, Lyapunov spectrum,
           energy spectrum of the attractor (dt 0.5 against dt 0.05)
    python benchmarks/baselines_ks.py filters [--quick] [--only TEXT] [--cycles 10500] [--experiments 4]
        -> docs/results/ks_baselines.{md,json}: aRMSE ± CI of each method at its tuned hyperparameters
    python benchmarks/baselines_ks.py render RUN1.json RUN2.json  -> one table from the rows of several runs

Protocol of `filters` (as baselines_l96.py): hyperparameters tuned by one batched grid run on tuning seeds
(seed 1), the best value scored on other seeds (seed 0), so the score carries no selection bias.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (TABLE_PROTOCOL, baseline_table, command_line, merge_rows, provenance,  # noqa: E402
                     score_methods)

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "ks"
REF = ROOT / "tests" / "data" / "ks_etdrk4_reference.npz"


# ---------------------------------------------------------------- the model

def model_checks(a) -> None:
    from danlab.diagnostics.lyapunov import lyapunov_spectrum
    from danlab.models.ks import KuramotoSivashinsky

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    # (a) the independent reference (tests/data/make_ks_reference.py)
    ref = np.load(REF)
    model = KuramotoSivashinsky(dt=float(ref["dt"]), substeps=1, contour_points=int(ref["contour_points"]))
    x, errs = torch.from_numpy(ref["u0"]), []
    for expected in ref["traj"]:
        x = model.step(x)
        errs.append(float(np.abs(x.numpy() - expected).max() / np.abs(expected).max()))
    res["reference_max_rel_error_10_steps"] = max(errs)
    # (b) Lyapunov spectrum by QR of the tangent-linear model (autograd), per cycle Δt = 1
    model = KuramotoSivashinsky()
    g = torch.Generator().manual_seed(0)
    x0 = model.spinup(model.initial(torch.randn(a.trajectories, model.Nx, generator=g, dtype=torch.float64)), 100.0)
    t0 = time.perf_counter()
    ds = lyapunov_spectrum(model, x0, a.cycles + a.transient, n=a.exponents, transient=a.transient, tol=a.tol,
                           generator=g)
    lam = ds.lyapunov.values
    # the spread of the estimate: λ from each trajectory's own average (independent trajectories)
    res |= {"lyapunov": [round(float(v), 5) for v in lam], "positive": ds.attrs["positive"],
            "nonnegative": ds.attrs["nonnegative"], "neutral_tol": a.tol, "lyapunov_time_units": ds.attrs["time_units"],
            "trajectories": a.trajectories, "transient_cycles": a.transient, "lyapunov_wall_s": time.perf_counter() - t0}
    # (c) the energy spectrum of the attractor, at dt 0.5 and 0.05 (a time-step-converged statistic)
    spectra = {}
    for dt in (0.5, 0.05):
        m = KuramotoSivashinsky(dt=dt, substeps=round(1 / dt))
        x = m.spinup(m.initial(torch.randn(8, m.Nx, generator=torch.Generator().manual_seed(1), dtype=torch.float64)), 100.0)
        spec, stds = 0.0, []
        for _ in range(a.spectrum_cycles):
            x = m(x)
            spec = spec + m.energy_spectrum(x).mean(0) / a.spectrum_cycles
            stds.append(float(x.std(-1).mean()))
        spectra[dt] = spec.numpy()
        res[f"spatial_std_dt{dt}"] = float(np.mean(stds))
    k = model.wavenumbers.numpy()
    s = spectra[0.5]
    res["spectrum_peak_k"] = float(k[1 + s[1:].argmax()])
    res["spectrum_k3_over_peak"] = float(s[np.abs(k - 3).argmin()] / s.max())
    res["spectrum_max_rel_diff_dt0.5_vs_0.05_k_le_3"] = float(np.max(np.abs(s - spectra[0.05])[k <= 3] / spectra[0.05][k <= 3]))
    (out / "ks_model.json").write_text(json.dumps(res, indent=1) + "\n")
    _plot_model(lam, k, spectra, out / "ks_model.png", a.tol)
    text = (f"# Kuramoto–Sivashinsky: validation of the model\n\nProduced by `{command_line()}` ({provenance()}).\n\n"
            "Setup: Nx 128, length 32π, ETDRK4 dt 0.5 (Kassam & Trefethen 2005), Δt 1 (2 steps per cycle).\n\n"
            f"- (a) Against an independent NumPy implementation of the same scheme (tests/data/make_ks_reference.py, "
            f"after Kassam & Trefethen's kursiv.m; test tests/test_ks.py): max relative difference over 10 steps "
            f"{res['reference_max_rel_error_10_steps']:.1e}.\n"
            f"- (b) Lyapunov spectrum (QR of the autograd tangent-linear model, {a.trajectories} trajectories × "
            f"{a.cycles} time units after {a.transient} of transient): λ_1 = {lam[0]:.3f} per time unit; "
            f"{int((lam > a.tol).sum())} exponents above {a.tol}, {int((abs(lam) <= a.tol).sum())} within ±{a.tol} (three "
            "of them are the neutral directions, time and space translation and the conserved mean; the estimate's "
            "own scatter is of the order of the smallest of them), the rest negative. "
            f"Leading 16: {', '.join(f'{v:.4f}' for v in lam[:16])}.\n"
            "  DAPPER's own estimate for this model (dapper/mods/explore_props.py, dt 0.25): "
            "\"Lyapunov exponents: [0.08 0.07 0.06 ...]\". The values λ_1 ≈ 0.043–0.05 with 6–7 positive "
            "exponents that we were given for orientation were not confirmed for L = 32π: DAPPER's estimate and "
            "ours agree with each other and are about twice as large (no published spectrum for this domain was "
            "found within reach here).\n"
            f"- (c) Energy spectrum of the attractor (8 trajectories × {a.spectrum_cycles} cycles): peak at k = "
            f"{res['spectrum_peak_k']:.2f} (the most unstable wavenumber of the linear part is 1/√2 = 0.71), "
            f"exponential tail, {res['spectrum_k3_over_peak']:.1e} of the peak at k = 3; dt 0.5 and dt 0.05 agree "
            f"to {100 * res['spectrum_max_rel_diff_dt0.5_vs_0.05_k_le_3']:.0f} % (max relative difference, k ≤ 3: "
            f"sampling noise of the time means). Spatial std: {res['spatial_std_dt0.5']:.3f} (dt 0.5), "
            f"{res['spatial_std_dt0.05']:.3f} (dt 0.05).\n\n![Lyapunov and energy spectra](ks_model.png)\n")
    (out / "ks_model.md").write_text(text)
    print(text)


def _plot_model(lam, k, spectra, path, tol) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(np.arange(1, lam.size + 1), lam, "o-", ms=3)
    a1.axhline(0, color="k", lw=0.5)
    a1.axhspan(-tol, tol, color="0.9", label=f"neutral (±{tol})")
    a1.set_xlabel("exponent index i")
    a1.set_ylabel("λ_i (per model time unit)")
    a1.set_title("Lyapunov spectrum, KS Nx 128, L = 32π", fontsize=9)
    a1.legend(fontsize=8)
    for dt, s in spectra.items():
        a2.semilogy(k[1:], s[1:], lw=1, label=f"ETDRK4 dt {dt}")
    a2.axvline(1 / math.sqrt(2), color="k", lw=0.5, ls=":", label="most unstable k = 1/√2")
    a2.set_xlabel("wavenumber k")
    a2.set_ylabel("mean |û_k|² / Nx²")
    a2.set_title("energy spectrum of the attractor", fontsize=9)
    a2.legend(fontsize=8)
    fig.text(0.01, 0.01, "python benchmarks/baselines_ks.py model", fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the filters

# name, config file, overrides, tuning grids (none: no tuning), published score (DAPPER, bocquet2019 settings)
METHODS = [
    ("ETKF, N=20, tuned inflation", "etkf.yaml", ["filter.N=20"], ["infl=1.02,1.03,1.05,1.07"], "0.115 (infl 1.03)"),
    ("EnKF-N, N=20, xN=1", "enkf_n.yaml", ["filter.N=20", "filter.xN=1"], [], "—"),
    ("EnKF-N, N=20, xN=2", "enkf_n.yaml", ["filter.N=20", "filter.xN=2"], [], "—"),
    ("LETKF, N=16, tuned radius and inflation", "letkf.yaml", ["filter.N=16"],
     ["radius=25,51,80", "infl=1.02,1.04,1.06"], "0.11 (radius 51, infl 1.02)"),
    ("LETKF, N=6, tuned radius and inflation", "letkf.yaml", ["filter.N=6"],
     ["radius=10,15,25", "infl=1.02,1.03,1.04,1.06"], "0.14 (radius 25, infl 1.06)"),
    ("LETKF, N=4, tuned radius and inflation", "letkf.yaml", ["filter.N=4"],
     ["radius=5,7,10,15", "infl=1.06,1.08,1.11,1.16"], "0.18 (radius 15, infl 1.11)"),
    ("local EnKF-N, N=6, radius 15, xN=1", "letkf.yaml",
     ["filter.N=6", "filter.prior=N", "filter.radius=15", "filter.infl=1.0", "filter.xN=1"], [], "—"),
    ("local EnKF-N, N=6, radius 15, xN=2", "letkf.yaml",
     ["filter.N=6", "filter.prior=N", "filter.radius=15", "filter.infl=1.0", "filter.xN=2"], [], "—"),
    ("3D-Var, tuned B scale", "var3d.yaml", [], ["scale=0.02,0.05,0.1,0.2"], "0.5 (optimal interpolation)"),
    ("IEnKF, N=20, tuned inflation", "ienkf.yaml", ["filter.N=20"], ["infl=1.01,1.02,1.03,1.05"], "—"),
]


KS_INTRO = ("# Classical baselines, Kuramoto–Sivashinsky (Nx 128, length 32π, ETDRK4 dt 0.5, Δt 1, H = I, R = I)\n\n"
            + TABLE_PROTOCOL + "Published: DAPPER's bocquet2019 settings (dapper/mods/KS/bocquet2019.py), which inflate "
            "after the analysis, add random rotations and score 2 × 10^4 cycles; their LETKF radius is loc_rad × 1.82 "
            "here (the Gaspari–Cohn half-width, in sites), with blocks of 4 sites as here. Climatology (the mean state) "
            "scores the spatial std of the attractor, 1.3 (docs/results/ks_model.md); DAPPER lists 1.3.\n\n")


def filter_table(a) -> None:
    cycles, exps = (a.cycles or (1_500 if a.quick else 10_500)), (a.experiments or (2 if a.quick else 4))
    burn = 500 if a.quick else 1000
    # tuning runs as long as the scoring runs of the reference table (5,500 cycles) on 4 experiments: an inflation at
    # the edge of stability loses the truth in some experiments only, some after thousands of cycles (see
    # reproduce.py's KS budget), and a grid point where any tuning experiment diverged is not a candidate
    tune_cycles, tune_burn, tune_exps = (800, 300, 2) if a.quick else (5_500, 500, 4)
    if a.burn_in is not None:
        burn = a.burn_in
    if a.tune_cycles is not None:
        tune_cycles, tune_burn = a.tune_cycles, min(tune_burn, a.tune_cycles // 3)
    rows = score_methods(METHODS, CFG, a, cycles=cycles, exps=exps, burn=burn, tune_cycles=tune_cycles,
                         tune_burn=tune_burn, tune_exps=tune_exps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "ks_baselines" + ("_quick" if a.quick else "")
    if a.only and (out / f"{stem}.json").is_file():  # keep the other methods' rows, in the order of METHODS
        rows = merge_rows(json.loads((out / f"{stem}.json").read_text()), rows, [m for m, *_ in METHODS])
    baseline_table(rows, out, stem, KS_INTRO)


def render(a) -> None:
    """Merge the rows of several runs' JSON files (later files win) into one table."""
    rows: list[dict] = []
    for path in a.rows:
        rows = merge_rows(rows, json.loads(Path(path).read_text()), [m for m, *_ in METHODS])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline_table(rows, out, a.stem, KS_INTRO, a.note or "")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    m = sub.add_parser("model", help="the model's validation")
    m.add_argument("--cycles", type=int, default=1500, help="time units of the Lyapunov estimate per trajectory")
    m.add_argument("--transient", type=int, default=200)
    m.add_argument("--trajectories", type=int, default=4)
    m.add_argument("--exponents", type=int, default=32)
    m.add_argument("--tol", type=float, default=0.005)
    m.add_argument("--spectrum-cycles", type=int, default=500)
    f = sub.add_parser("filters", help="the classical baselines table")
    f.add_argument("--quick", action="store_true", help="short runs (a smoke test, not the reference figures)")
    f.add_argument("--only", help="run only the methods whose name contains this text, or one of the texts "
                   "separated by | (their rows replace those of the same name in the existing table)")
    f.add_argument("--cycles", type=int, default=None, help="cycles of each scored experiment (default 10500)")
    f.add_argument("--experiments", type=int, default=None, help="scored experiments (default 4)")
    f.add_argument("--burn-in", type=int, default=None, help="cycles not scored (default 1000)")
    f.add_argument("--tune-cycles", type=int, default=None, help="cycles of each tuning experiment (default 5500)")
    f.add_argument("--tuned-from", help="take the tuned values from this earlier baselines_ks.json instead of tuning")
    r = sub.add_parser("render", help="merge the rows of earlier runs into one table")
    r.add_argument("rows", nargs="+", help="JSON files written by `filters` (later files win)")
    r.add_argument("--stem", default="ks_baselines")
    r.add_argument("--note", help="a paragraph appended to the table (e.g. which runs tuned the values)")
    for p in (m, f, r):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"model": model_checks, "filters": filter_table, "render": render}[a.part](a)


if __name__ == "__main__":
    main()
