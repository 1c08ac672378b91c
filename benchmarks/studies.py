"""Gather the sensitivity-study sweeps into docs/results/studies/: each sweep's data (CSV, netCDF) and
figure, plus one figure per study that puts a_θ beside the classical filters on the same axis.

    for s in configs/sweeps/*.yaml; do danlab sweep $s --budget reduced; done
    python benchmarks/studies.py --budget reduced

Reads runs/sweeps/<name>-<budget>/results.{csv,nc}, or, for a sweep not run on this machine, the copy gathered
before in docs/results/studies/<budget>/<name>/ (whose NOTE.md, if any, says what its table cannot: a rerun, its
code); writes docs/results/studies/<budget>/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, provenance  # noqa: E402

from danlab.config import RENAMED  # noqa: E402
from danlab.experiments.sweep import grid_points, load_sweep  # noqa: E402
from danlab.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# a copy gathered before a key was renamed (model.steps, train.Ne) names its axis as the sweep files do now
UPGRADED = {old: f"{old.split('.')[0]}.{new}" for old, new in RENAMED.items()}

# study: (axis label, [(sweep name, label, axis key, transform of the axis)])
STUDIES = {
    "nt": ("N_t (concurrent training trajectories)", [("nt", "a_θ", "train.Nt", None)]),
    "nf": ("N_f (filters)", [("nf", "a_θ", "net.Nf", None)]),
    "depth": ("N_l (layers per block)", [("depth", "a_θ", "net.Nl", None)]),
    "ne": ("ensemble size", [("ne_dan", "a_θ", "train.N", None), ("ne_enkf_n", "EnKF-N", "filter.N", None)]),
    "niter": ("N_iter (chained cycles per step)", [("niter", "a_θ", "train.N_iter", None)]),
    "sigma": ("observation noise σ", [("sigma_dan", "a_θ", "observations.sigma", None),
                                      ("sigma_enkf_n", "EnKF-N, N=20", "observations.sigma", None)]),
    "sparsity": ("observed fraction of the sites", [("sparsity_dan", "a_θ (one network, trained on 10-40 sites)", "evaluate.observations.fraction", None),
                                                    ("sparsity_enkf_n", "EnKF-N, N=20", "observations.fraction", None)]),
    "dt": ("observation interval Δt", [("dt_dan", "a_θ", "model.substeps", 0.05), ("dt_enkf_n", "EnKF-N, N=20", "model.substeps", 0.05),
                                       ("dt_ienkf", "IEnKF, N=20", "model.substeps", 0.05), ("dt_var3d", "3D-Var, tuned", "model.substeps", 0.05)]),
}


def sweep_path(name: str, budget: str) -> Path:
    """A budget's own sweep file if it has one (nt_medium.yaml), else the sweep's file (nt.yaml)."""
    own = ROOT / "configs" / "sweeps" / f"{name}_{budget}.yaml"
    return own if own.is_file() else ROOT / "configs" / "sweeps" / f"{name}.yaml"


def gathered(name: str, budget: str, sweeps: Path, out: Path) -> Path | None:
    """The folder holding a sweep's results.csv: this machine's run, else the copy gathered before."""
    for d in (sweeps / f"{name}-{budget}", out / name):
        if (d / "results.csv").is_file():
            return d
    return None


def read_results(d: Path) -> pd.DataFrame:
    """A gathered results.csv, its axes and point ids under the names the sweep files use now."""
    df = pd.read_csv(d / "results.csv").rename(columns=UPGRADED)
    for old, new in UPGRADED.items():
        df["point"] = df["point"].str.replace(f"{old}=", f"{new}=", regex=False)
    return df


def point_hashes(name: str, budget: str) -> dict[str, tuple[str, dict]]:
    """{point id: (config hash, axis values)} of a sweep file's grid, as `danlab sweep` computes them."""
    try:
        points = grid_points(load_sweep(sweep_path(name, budget), budget))
    except Exception:  # noqa: BLE001 - a sweep file that no longer loads shares nothing
        return {}
    return {p.id: (p.hash, p.values) for p in points if not p.error}


def fill_shared_points(name: str, df: pd.DataFrame, budget: str, sweeps: Path, out: Path) -> pd.DataFrame:
    """The points of `name`'s grid it has not run but another gathered sweep has, with the same config hash (the
    same network evaluated the same way: e.g. σ 1 of the σ study is N_iter 10 of the N_iter study), taken from that
    sweep and marked in a `same_as` column."""
    own = point_hashes(name, budget)
    if "status" in df:  # a point `--only` left out (status 2) is one this sweep has not run
        df = df[df["status"] != 2]
    missing = {pid: hv for pid, hv in own.items() if pid not in set(df["point"])}
    rows = []
    for other in sorted({n for _, parts in STUDIES.values() for n, *_ in parts} - {name}):
        if not missing:
            break
        src = gathered(other, budget, sweeps, out)
        if src is None:
            continue
        by_hash = {h: pid for pid, (h, _) in point_hashes(other, budget).items()}
        odf = read_results(src)
        for pid, (h, values) in list(missing.items()):
            found = odf[odf["point"] == by_hash.get(h)]
            if len(found):
                row = found.iloc[0].copy()
                for axis, v in values.items():
                    row[axis] = v
                row["point"], row["same_as"] = pid, f"{other}: {by_hash[h]}"
                rows.append(row)
                del missing[pid]
    return pd.concat([df, pd.DataFrame(rows)], ignore_index=True).fillna({"same_as": ""}) if rows else df


def seed_summary(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per value of the axis: the mean aRMSE over the training seeds, their min, max and number, the mean CI."""
    g = df.groupby(key)["armse"]
    return pd.DataFrame({"mean": g.mean(), "min": g.min(), "max": g.max(), "seeds": g.count(),
                         "ci": df.groupby(key)["armse_ci"].mean()}).reset_index().sort_values(key)


def trend_table(m: pd.DataFrame, key: str) -> str:
    """Each step along the axis: the change of the seed mean against the noise it must exceed to count, the larger of
    the two points' seed ranges and of their evaluation CIs (one experiment's ± 95 %)."""
    rows = []
    for (_, p), (_, q) in zip(m.iterrows(), m.iloc[1:].iterrows()):
        step = f"{p[key]:g} → {q[key]:g}"
        lost = [f"{r[key]:g}" for r in (p, q) if pd.isna(r["mean"])]
        if lost:  # every experiment of a seed diverged: there is no score to compare
            rows.append([step, "—", "—", f"no score at {' and '.join(lost)} (diverged)"])
            continue
        change = q["mean"] - p["mean"]
        noise = max(p["max"] - p["min"], q["max"] - q["min"], p["ci"], q["ci"])
        rows.append([step, f"{change:+.4f}", f"{noise:.4f}",
                     "exceeds the noise" if abs(change) > noise else "within the noise"])
    return markdown_table(["step", "change of the seed mean", "seed range or CI (the larger)", "verdict"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="reduced")
    ap.add_argument("--sweeps", default=str(ROOT / "runs" / "sweeps"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "studies"))
    a = ap.parse_args()
    out = Path(a.out) / a.budget
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Sensitivity studies ({a.budget} budget)\n", f"Gathered by `{command_line()}` ({provenance()}).\n"]
    for study, (xlabel, parts) in STUDIES.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        found = False
        md.append(f"\n## {study}\n")
        for name, label, key, scale in parts:
            sweep_file = sweep_path(name, a.budget).name
            dst = out / name
            src = gathered(name, a.budget, Path(a.sweeps), out)  # this machine's run, else the copy gathered before
            if src is None:
                md.append(f"- `{name}`: not run (`danlab sweep configs/sweeps/{sweep_file} --budget {a.budget}`)\n")
                continue
            found = True
            dst.mkdir(exist_ok=True)
            for f in ("results.csv", "results.nc", "results.png", "sweep.yaml"):
                if (src / f).is_file() and src != dst:
                    shutil.copy2(src / f, dst / f)
            df = read_results(src)
            df = fill_shared_points(name, df, a.budget, Path(a.sweeps), out)
            df = df[df["status"] == 0] if "status" in df else df
            # the other swept axes (not the tuned values a tune sweep reports as best_<key>, which vary with the axis)
            others = [c for c in df.columns if "." in c and c != key and not c.startswith("best_")
                      and df[c].nunique() > 1]
            seeds = "seed" in df and df["seed"].nunique() > 1  # training seeds as an axis: their spread is the error bar
            groups = df.groupby(others) if others else [(None, df)]
            for gkey, g in groups:
                lab = label if gkey is None else f"{label}, {others[0]}={gkey[0] if isinstance(gkey, tuple) else gkey}"
                if seeds:
                    m = seed_summary(g, key)
                    x = m[key] * (scale or 1)
                    ax.errorbar(x, m["mean"], yerr=[m["mean"] - m["min"], m["max"] - m["mean"]], marker="o", ms=3,
                                capsize=3, label=f"{lab} (mean of {g['seed'].nunique()} training seeds; bar: their range)")
                    ax.plot(g[key] * (scale or 1), g["armse"], ".", color="grey", ms=4)
                    continue
                g = g.sort_values(key)
                x = g[key] * (scale or 1)
                ax.errorbar(x, g["armse"], yerr=g["armse_ci"], marker="o", ms=3, capsize=2, label=lab)
            axes = [c for c in [key] + others + (["seed"] if seeds else []) if c in df]
            cols = axes + ["armse", "armse_ci", "n_diverged"]
            cols += [c for c in df.columns if c.startswith("best_") or c in ("tune_armse", "val_armse", "same_as")]
            note = dst / "NOTE.md"  # the provenance of a copy that a table alone cannot say (a rerun, its code)
            note = f"; {note.read_text().strip()}" if note.is_file() else ""
            md.append(f"**{label}** (`danlab sweep configs/sweeps/{sweep_file} --budget {a.budget}`{note}):\n\n")
            md.append(markdown_table(cols, df.sort_values(axes)[cols].values.tolist()) + "\n")
            if seeds:  # a trend table per combination of the other axes
                for gkey, g in groups:
                    head = "" if gkey is None else ", ".join(
                        f"{o}={v}" for o, v in zip(others, gkey if isinstance(gkey, tuple) else (gkey,))) + ":\n\n"
                    md.append("\n" + head + trend_table(seed_summary(g, key), key) + "\n")
        if found:
            ax.set_xlabel(xlabel)
            ax.set_ylabel("aRMSE")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
            ax.set_title(f"{study} ({a.budget} budget)", fontsize=9)
            fig.tight_layout()
            fig.savefig(out / f"{study}.png", dpi=110)
            md.append(f"![{study}]({study}.png)\n")
        plt.close(fig)
    atomic_write_text(out / "README.md", "".join(md))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
