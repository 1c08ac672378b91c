"""Figures of `danlab analyse`, drawn from its Dataset (analysis.nc) and summary alone: nothing is computed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

N_LEAD = 10
LYAP_REF = 1.7  # L96, Nx 40, F 8: leading exponent per time unit (literature)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _caption(fig, summary: dict) -> None:
    cmd = summary.get("command") or "danlab analyse"
    fig.text(0.005, 0.005, f"{cmd}   (Nx {summary['Nx']}, {summary['cycles'] - summary['burn_in']} scored cycles, seed {summary['seed']})",
             fontsize=6.5, color="0.35", ha="left", va="bottom")


def _save(fig, path: Path) -> str:
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def plot_spectra(ds: xr.Dataset, summary: dict, path: Path) -> str:
    plt = _plt()
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    m = ds["mode"].values
    for v, lab, st in (("eig_dan", "a_θ: Jacobian ∂a/∂ζ", dict(color="C0", lw=1.6)),
                       ("eig_dan_ls", "a_θ: least squares (eqs. 9–11)", dict(color="C0", ls="--", lw=1)),
                       ("eig_enkf", "EnKF-N, N = 40 (X^a X^aᵀ)", dict(color="C3", lw=1.6))):
        if v in ds:
            y = np.where(ds[v].values > 0, ds[v].values, np.nan)
            ax.plot(m, y, marker="o", ms=2.5, label=lab, **st)
    ax.axvspan(0.5, N_LEAD + 0.5, color="0.9", zorder=0, label=f"first {N_LEAD} modes")
    ax.set_yscale("log")
    top = float(np.nanmax(ds["eig_dan"].values))
    ax.set_ylim(top * 1e-6, top * 2)  # the EnKF's null mode (rank N - 1) and negative eigenvalues are off the log scale
    ax.set_xlabel("mode (sorted eigenvalue index)")
    ax.set_ylabel("time-averaged eigenvalue of P^a (state units²)")
    neg = int((ds["eig_dan"].values <= 0).sum())
    ax.set_title("eigenspectra of P^a" + (f" ({neg} non-positive a_θ modes not drawn)" if neg else ""), fontsize=10)
    ax.legend(fontsize=7)
    r = np.where(ds["eig_dan"].values > 0, ds["eig_ratio"].values, np.nan)  # modes where a_θ's eigenvalue is ≤ 0: not drawn
    ax2.plot(m, r, marker="o", ms=3, color="C2")
    ax2.axhline(1.0, color="k", lw=0.6, ls=":")
    ax2.axvspan(0.5, N_LEAD + 0.5, color="0.9", zorder=0)
    ax2.set_yscale("log")
    ax2.set_xlabel("mode")
    ax2.set_ylabel("eig(a_θ) / eig(EnKF-N)")
    ax2.set_title("ratio per mode (> 1: a_θ inflates)", fontsize=10)
    off = ds["offset"].values
    ax3.plot(off, ds["pa_row_dan"].values, marker="o", ms=2.5, label="a_θ (Jacobian)")
    ax3.plot(off, ds["pa_row_enkf"].values, marker="o", ms=2.5, color="C3", label="EnKF-N, N = 40")
    ax3.axhline(0, color="k", lw=0.5)
    ax3.set_xlabel("offset p (sites)")
    ax3.set_ylabel("⟨P^a[i, i+p]⟩ (state units²)")
    ax3.set_title("translation-averaged row of P^a", fontsize=10)
    ax3.legend(fontsize=7)
    _caption(fig, summary)
    return _save(fig, path)


def plot_sensitivity(ds: xr.Dataset, summary: dict, path: Path) -> str:
    plt = _plt()
    from matplotlib.colors import LogNorm
    fig, axs = plt.subplots(1, 2, figsize=(10, 4.3))
    p, q = ds["offset_zeta"].values, ds["offset_x"].values
    ext = [q[0] - 0.5, q[-1] + 0.5, p[0] - 0.5, p[-1] + 0.5]
    A = ds["sens_abs"].values
    im = axs[0].imshow(A, origin="lower", extent=ext, norm=LogNorm(vmin=max(A.max() * 1e-4, A[A > 0].min()), vmax=A.max()),
                       cmap="viridis", aspect="equal")
    fig.colorbar(im, ax=axs[0], label="⟨|∂P^a[i,i+p]/∂x[i+q]|⟩")
    r = summary["sensitivity_extent"]
    axs[0].add_patch(plt.Rectangle((-r - 0.5, -r - 0.5), 2 * r + 1, 2 * r + 1, fill=False, ec="w", lw=1, ls="--"))
    axs[0].set_title(f"absolute sensitivity; 95 % within {r} sites (dashed)", fontsize=9)
    M = ds["sens_mean"].values
    lim = np.abs(M).max()
    im = axs[1].imshow(M, origin="lower", extent=ext, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="equal")
    fig.colorbar(im, ax=axs[1], label="⟨∂P^a[i,i+p]/∂x[i+q]⟩")
    axs[1].set_title("signed mean sensitivity", fontsize=9)
    for ax in axs:
        ax.set_xlabel("state offset q (sites)")
        ax.set_ylabel("innovation offset p (sites)")
    _caption(fig, summary)
    return _save(fig, path)


def plot_lyapunov(ds: xr.Dataset, summary: dict, path: Path) -> str:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lam = ds["lyapunov"].values
    i = ds["exponent"].values
    ax.plot(i, lam, marker="o", ms=2.5)
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(LYAP_REF, color="0.5", lw=0.6, ls="--", label=f"literature λ₁ ≈ {LYAP_REF} (Nx 40, F 8)")
    n0 = summary["lyapunov_nonnegative"]
    ax.axvline(n0 + 0.5, color="C3", lw=0.8, ls=":", label=f"{n0} non-negative ({summary['lyapunov_positive']} > 0)")
    ax.set_xlabel("index")
    ax.set_ylabel("Lyapunov exponent (per time unit)")
    ax.set_title("Lyapunov spectrum along the truth", fontsize=10)
    ax.legend(fontsize=7)
    bins = np.linspace(0, 1, 41)
    for v, lab, c in (("alignment_cos_dan", "a_θ", "C0"), ("alignment_cos_enkf", "EnKF-N, N = 40", "C3")):
        ax2.hist(ds[v].values.ravel(), bins=bins, alpha=0.5, color=c, density=True,
                 label=f"{lab}: mean {float(ds[v].mean()):.3f}")
    ax2.axvline(summary["alignment_cos_random"], color="k", ls=":", lw=0.8,
                label=f"random subspaces: {summary['alignment_cos_random']:.3f}")
    ax2.set_xlabel(f"cosine of principal angles ({summary['alignment_k']} leading eigenvectors of P^a vs BLVs)")
    ax2.set_ylabel("density")
    ax2.set_title("alignment with the unstable-neutral subspace", fontsize=10)
    ax2.legend(fontsize=7)
    _caption(fig, summary)
    return _save(fig, path)


def plot_run(ds: xr.Dataset, summary: dict, path: Path) -> str:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    c = ds["cycle"].values
    ax.plot(c, ds["rmse_a_dan"].values, lw=0.5, label=f"a_θ analysis RMSE (aRMSE {summary['armse_dan']:.3f})")
    ax.plot(c, ds["rmse_a_enkf"].values, lw=0.5, color="C3", alpha=0.7,
            label=f"EnKF-N analysis RMSE (aRMSE {summary['armse_enkf']:.3f})")
    ax.plot(c, ds["b_k"].values, lw=0.5, color="k", label=f"b_k = ‖a_θ(x^f, 0)‖/√Nx (b {summary['b']:.1e}, s {summary['s']:.1e})")
    ax.axvline(summary["burn_in"], color="k", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("cycle")
    ax.set_ylabel("state units")
    ax.set_title("zero-innovation response against the analysis error", fontsize=10)
    ax.set_ylim(top=3)
    ax.legend(fontsize=7, loc="upper right", ncol=1, framealpha=0.9)
    B0 = summary["burn_in"]
    tr = ds["truth"].values[B0:]
    bins = np.linspace(-1.5, 1.5, 61)
    for v, lab, col in (("xf_dan", "a_θ forecast", "C0"), ("xf_enkf", "EnKF-N forecast", "C3")):
        e = (ds[v].values[B0:] - tr).ravel()
        ax2.hist(e, bins=bins, density=True, histtype="step", color=col, label=lab)
    sd = summary["errors"]["dan"]["forecast"]["std"]
    xx = np.linspace(bins[0], bins[-1], 200)
    ax2.plot(xx, np.exp(-xx**2 / (2 * sd**2)) / np.sqrt(2 * np.pi * sd**2), color="k", lw=0.6, ls="--",
             label="Gaussian, a_θ forecast std")
    ax2.set_yscale("log")
    ax2.set_ylim(bottom=1e-4)
    ax2.set_xlabel("forecast error (state units)")
    ax2.set_ylabel("density")
    ed = summary["errors"]["dan"]["forecast"]
    ax2.set_title(f"forecast errors (a_θ: skew {ed['skewness']:.2f}, ex. kurt. {ed['excess_kurtosis']:.2f})", fontsize=9)
    ax2.legend(fontsize=7)
    _caption(fig, summary)
    return _save(fig, path)


def plot_all(ds: xr.Dataset, summary: dict, out: Path) -> list[str]:
    out = Path(out)
    return [plot_spectra(ds, summary, out / "spectra.png"), plot_sensitivity(ds, summary, out / "sensitivity.png"),
            plot_lyapunov(ds, summary, out / "lyapunov.png"), plot_run(ds, summary, out / "run.png")]
