"""`danlab analyse`: run a trained a_θ as a filter beside an EnKF-N on one long twin, and explain what it learned.

One truth trajectory of the model the network was trained on, its observations, and on them, concurrently: the
network with a single state (Ne = 1), the EnKF-N with N = 40 members (xN = 2, as configs/l96/enkf_n.yaml), and the
QR iteration of the tangent-linear model along the truth (backward Lyapunov vectors). Then, over the scored cycles
(after the burn-in): the zero-innovation response b, s at every cycle; both estimates of P^a at `snapshots`
evenly spaced cycles (the network's forecasts), with the EnKF-N's analysis covariance at the same cycles; the
sensitivity maps at the first `sens_snapshots` of them (the least-squares one at `sens_ls_snapshots`); the
alignment of the leading eigenvectors of both P^a with the unstable-neutral backward Lyapunov vectors; the error
moments. Everything goes into one xarray Dataset (analysis.nc), figures (PNG) and summary.json, written into a
temporary folder and moved into `out` only once complete.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from danlab.config import ConfigError, ObsConfig, model_config, validate
from danlab.cycle import initial_ensemble
from danlab.diagnostics import errors, expansion, lyapunov, sensitivity, spectra
from danlab.filters.ensemble import EnKF_N
from danlab.io import check_output_dir, code_version, write_json
from danlab.learned import Learned, load_net, resolve_net_dir
from danlab.metrics import mean_with_ci, rmse
from danlab.rng import BatchRNG, make_generator
from danlab.twin import TwinStream

WEIGHTS = Path("weights")  # the shipped weights, named relative to the repository root the command runs in
N_LEAD = 10  # the leading modes the reference work compares


@dataclass(frozen=True)
class Budget:
    cycles: int
    burn_in: int
    snapshots: int  # cycles at which P^a is estimated (both ways) and compared with the EnKF-N's
    n_samples: int  # N_p, innovations sampled for the least-squares P^a
    sens_snapshots: int  # of those, how many get the (costly) exact sensitivity tensor
    sens_ls_snapshots: int  # ... and the least-squares one
    scale: float = 1.0  # innovation scale s: δ_j ~ N(0, s² R)


# Burn-in of 1,000 cycles = 50 time units: the QR iteration needs that long for the unstable-neutral subspace of the
# backward Lyapunov vectors to converge (its slowest gap, λ_14 - λ_15 ≈ 0.06, is the one that matters).
QUICK = Budget(cycles=2_000, burn_in=1_000, snapshots=30, n_samples=200, sens_snapshots=3, sens_ls_snapshots=1)
FULL = Budget(cycles=10_000, burn_in=1_000, snapshots=200, n_samples=400, sens_snapshots=20, sens_ls_snapshots=2)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"analyse: {msg}", file=sys.stderr, flush=True)


def resolve_weights(weights: str | Path) -> Path:
    """A network folder, a training run folder, or the name of a folder under weights/."""
    p = Path(weights)
    if not p.exists() and not p.is_absolute() and (WEIGHTS / p).exists():
        p = WEIGHTS / p
    return resolve_net_dir(p)


def prepare(weights: str | Path, *, cycles: int | None = None, burn_in: int | None = None, nx: int | None = None,
            quick: bool = False, n_samples: int | None = None, scale: float | None = None, snapshots: int | None = None):
    """Validate everything before any work: returns (net, meta, weights dir, model, observer, budget).
    Raises ConfigError / CheckpointError with one line naming the problem."""
    b = QUICK if quick else FULL
    upd = {k: v for k, v in dict(cycles=cycles, burn_in=burn_in, n_samples=n_samples, scale=scale,
                                   snapshots=snapshots).items() if v is not None}
    b = replace(b, **upd)
    if b.cycles < 2:
        raise ConfigError(f"--cycles must be >= 2 (got {b.cycles})")
    if not 0 <= b.burn_in < b.cycles:
        raise ConfigError(f"--burn-in must be in [0, cycles) (got burn-in {b.burn_in}, cycles {b.cycles})")
    if nx is not None and nx < 8:
        raise ConfigError(f"--nx must be an integer >= 8 (got {nx})")
    if b.snapshots < 1:
        raise ConfigError(f"--snapshots must be >= 1 (got {b.snapshots})")
    if not (b.scale > 0 and math.isfinite(b.scale)):
        raise ConfigError(f"--innovation-scale must be > 0 (got {b.scale})")
    path = resolve_weights(weights)
    net, meta = load_net(path)
    trained = meta.get("trained_with") or {}
    mdata = dict(trained.get("model") or {})
    if mdata.get("name", "lorenz96") != "lorenz96":
        raise ConfigError(f"{path}: the network was trained on model {mdata.get('name')!r}; analyse needs a Lorenz 96 network")
    if nx is not None:
        mdata["Nx"] = nx
    mcfg = model_config(mdata)
    ocfg = validate(ObsConfig, dict(trained.get("observations") or {}))
    try:
        observer = ocfg.build(mcfg.Nx)
    except ValueError as exc:
        raise ConfigError(f"observations at Nx {mcfg.Nx}: {exc}") from None
    Nx = mcfg.Nx
    if b.n_samples <= Nx:
        raise ConfigError(f"--np must exceed Nx = {Nx} for the least-squares fit (got {b.n_samples})")
    b = replace(b, snapshots=min(b.snapshots, b.cycles - b.burn_in))
    b = replace(b, sens_snapshots=min(b.sens_snapshots, b.snapshots), sens_ls_snapshots=min(b.sens_ls_snapshots, b.snapshots))
    return net, meta, path, mcfg.build(), observer, b


def simulate(net, model, observer, cycles: int, seed: int, snap_idx: np.ndarray, N_enkf: int = 40, xN: float = 2.0,
             quiet: bool = True) -> dict:
    """Cycle the network (Ne = 1) and the EnKF-N on one twin (same truth, same observations), and the QR iteration of
    the tangent-linear model along the truth. Returns numpy/torch arrays per cycle, and at the snapshot cycles the
    EnKF-N analysis ensemble and the backward Lyapunov vectors."""
    dt = torch.float64
    ids = [0]
    twin = TwinStream(model, observer, 1, seed, ids=ids, dtype=dt)
    dan = Learned.from_net(net, N=1)
    enkf = EnKF_N(N=N_enkf, xN=xN)
    rng_d, rng_e = BatchRNG(seed, "filter", 1, ids), BatchRNG(seed, "filter/enkf_n", 1, ids)
    E_d = initial_ensemble(twin.x, 1, BatchRNG(seed, "init", 1, ids))
    E_e = initial_ensemble(twin.x, N_enkf, BatchRNG(seed, "init/enkf_n", 1, ids))
    Nx = model.Nx
    Q = lyapunov.random_orthonormal(1, Nx, Nx, make_generator(seed, "analyse/qr"), dt)
    rec = {k: torch.empty(cycles, Nx, dtype=dt) for k in ("truth", "xf_dan", "xa_dan", "xf_enkf", "xa_enkf")}
    log_r = torch.empty(cycles, Nx, dtype=dt)
    S = len(snap_idx)
    snap_pos = {int(c): i for i, c in enumerate(snap_idx)}
    Ea_snap = torch.empty(S, N_enkf, Nx, dtype=dt)
    blv = torch.empty(S, Nx, Nx, dtype=dt)
    threshold = 1.2 * float(twin.x.std())
    resets = {"dan": 0, "enkf_n": 0}
    t0 = time.perf_counter()
    for k in range(cycles):
        x_prev = twin.x
        _, Q, lr = lyapunov.tangent_qr_step(model, x_prev, Q)
        x, obs = twin.step()
        with torch.no_grad():
            Ef_d, E_d = dan.cycle(E_d, model, obs, rng_d)
            Ef_e, E_e = enkf.cycle(E_e, model, obs, rng_e)
        for name, E in (("dan", E_d), ("enkf_n", E_e)):
            if not bool(torch.isfinite(E).all()) or float(rmse(E.mean(-2), x)[0]) > threshold:
                resets[name] += 1
        if not bool(torch.isfinite(E_d).all()):
            E_d = x.unsqueeze(-2).clone()
        if not bool(torch.isfinite(E_e).all()):
            E_e = x.unsqueeze(-2).expand_as(E_e).clone()
        rec["truth"][k] = x[0]
        rec["xf_dan"][k], rec["xa_dan"][k] = Ef_d[0, 0], E_d[0, 0]
        rec["xf_enkf"][k], rec["xa_enkf"][k] = Ef_e[0].mean(0), E_e[0].mean(0)
        log_r[k] = lr[0]
        if k in snap_pos:
            Ea_snap[snap_pos[k]] = E_e[0]
            blv[snap_pos[k]] = Q[0]
        if not quiet and (k + 1) % 1000 == 0:
            _log(f"cycle {k + 1}/{cycles} ({time.perf_counter() - t0:.0f} s)", quiet)
    return rec | {"log_r": log_r, "Ea_snap": Ea_snap, "blv": blv, "diverged_cycles": resets,
                  "threshold": threshold, "wall_s": time.perf_counter() - t0}


def _trailing_ratio(ev: xr.Dataset, n_lead: int) -> float:
    """Median of eig_dan / eig_enkf over the modes after the first n_lead where both are positive (nan if none)."""
    r = ev["eig_ratio"].values[n_lead:]
    ok = (ev["eig_dan"].values[n_lead:] > 0) & np.isfinite(r) & (r > 0)
    return float(np.median(r[ok])) if ok.any() else float("nan")


def analyse(weights: str | Path, *, cycles: int | None = None, burn_in: int | None = None, seed: int = 0,
            nx: int | None = None, quick: bool = False, n_samples: int | None = None, scale: float | None = None,
            snapshots: int | None = None, tol: float = 0.03, quiet: bool = True) -> tuple[xr.Dataset, dict]:
    """Everything `danlab analyse` computes, in memory: (the Dataset, the summary)."""
    t_start = time.perf_counter()
    net, meta, path, model, observer, b = prepare(weights, cycles=cycles, burn_in=burn_in, nx=nx, quick=quick,
                                                  n_samples=n_samples, scale=scale, snapshots=snapshots)
    Nx, K, B0 = model.Nx, b.cycles, b.burn_in
    snap_idx = np.unique(np.linspace(B0, K - 1, b.snapshots).round().astype(int))
    _log(f"{path}: Nx {Nx}, Δt {model.Dt:g}, {K} cycles ({B0} burn-in), {len(snap_idx)} snapshots, N_p {b.n_samples}", quiet)
    sim = simulate(net, model, observer, K, seed, snap_idx, quiet=quiet)
    _log(f"cycled a_θ, EnKF-N (N 40) and the tangent-linear QR in {sim['wall_s']:.0f} s", quiet)
    amap = expansion.net_map(net)
    cyc = np.arange(1, K + 1)
    scored = np.arange(K) >= B0

    # 1. zero-innovation response along the run
    ds_b = expansion.zero_innovation_dataset(expansion.zero_innovation_response(amap, sim["xf_dan"]), cyc, scored)
    # 2. operator expansion at the snapshots
    t0 = time.perf_counter()
    xs = sim["xf_dan"][snap_idx]
    ds_pa = expansion.operator_expansion(amap, xs, n_samples=b.n_samples, scale=b.scale, sigma=observer.sigma,
                                         seed=seed, cycles=cyc[snap_idx])
    _log(f"P^a by Jacobian and least squares at {len(snap_idx)} cycles in {time.perf_counter() - t0:.0f} s", quiet)
    P_jac = torch.from_numpy(ds_pa["pa_jacobian"].values)
    P_ls = torch.from_numpy(ds_pa["pa_ls"].values)
    P_enkf = spectra.ensemble_covariance(sim["Ea_snap"])
    # 3. spectra
    ds_sp = spectra.eigenspectra(P_jac, P_enkf, P_ls, names=("dan", "enkf"))
    # 4. sensitivity maps
    t0 = time.perf_counter()
    n_s, n_l = b.sens_snapshots, b.sens_ls_snapshots
    zeta = expansion.sample_innovations(n_l, b.n_samples, Nx, sigma=observer.sigma, scale=b.scale,
                                        generator=make_generator(seed, "analyse/ls-sensitivity"))
    sel = np.unique(np.linspace(0, len(snap_idx) - 1, n_s).round().astype(int))  # evenly spaced among the snapshots
    ds_se = sensitivity.sensitivity_maps(amap, xs[sel], cycles=cyc[snap_idx[sel]])
    if n_l:
        sl = sel[np.unique(np.linspace(0, len(sel) - 1, n_l).round().astype(int))]
        ds_sl = sensitivity.sensitivity_maps(amap, xs[sl], zeta=zeta, cycles=cyc[snap_idx[sl]])
        for v in ("sens_ls_mean", "sens_ls_abs"):
            ds_se[v] = ds_sl[v]
        for a in ("ls_snapshots", "ls_extent", "ls_vs_jacobian"):
            ds_se.attrs[a] = ds_sl.attrs[a]
    _log(f"sensitivity maps ({n_s} exact, {n_l} least-squares) in {time.perf_counter() - t0:.0f} s", quiet)
    # 5. Lyapunov exponents and alignment
    ds_ly = lyapunov.exponents_dataset(sim["log_r"][B0:], model.Dt, tol)
    n0 = max(int(ds_ly.attrs["nonnegative"]), 1)
    ds_al = lyapunov.alignment_dataset({"dan": P_jac, "enkf": P_enkf}, sim["blv"], n0, seed=seed)
    cos_d, cos_e, rand = ds_al["alignment_cos_dan"], ds_al["alignment_cos_enkf"], ds_al.attrs["random_baseline"]
    # 6. error moments
    sc = slice(B0, K)
    tr = sim["truth"][sc].numpy()
    errs = {"dan": {"forecast": sim["xf_dan"][sc].numpy() - tr, "analysis": sim["xa_dan"][sc].numpy() - tr},
            "enkf_n": {"forecast": sim["xf_enkf"][sc].numpy() - tr, "analysis": sim["xa_enkf"][sc].numpy() - tr}}
    ds_er = errors.error_moments(errs)
    # per-cycle statistics
    rm = {f"rmse_{s}_{f}": np.sqrt(((sim[f"x{s}_{f}"].numpy() - sim["truth"].numpy()) ** 2).mean(-1))
          for f in ("dan", "enkf") for s in ("f", "a")}
    ds_c = xr.Dataset({k: (("cycle",), v, {"long_name": f"spatial RMSE of the {'forecast' if '_f_' in k else 'analysis'} "
                                                        f"({'a_θ' if k.endswith('dan') else 'EnKF-N mean'})", "units": "state units"})
                       for k, v in rm.items()}, coords={"cycle": cyc})
    ds_c["truth"] = (("cycle", "site"), sim["truth"].numpy(), {"long_name": "true state", "units": "state units"})
    for k, ln in (("xf_dan", "a_θ forecast"), ("xa_dan", "a_θ analysis"), ("xf_enkf", "EnKF-N forecast mean"),
                  ("xa_enkf", "EnKF-N analysis mean")):
        ds_c[k] = (("cycle", "site"), sim[k].numpy(), {"long_name": ln, "units": "state units"})

    ds = xr.merge([ds_c, ds_b, ds_pa, ds_sp, ds_se, ds_ly, ds_al, ds_er], combine_attrs="override")
    ds["pa_enkf"] = (("snapshot", "row", "col"), P_enkf.numpy(),
                     {"long_name": "EnKF-N (N 40) analysis covariance X^a X^a^T at the snapshot cycles", "units": "state units^2"})
    ds = ds.assign_coords(site=np.arange(Nx))
    armse = {f: mean_with_ci(rm[f"rmse_a_{f}"][B0:]) for f in ("dan", "enkf")}
    ev = ds_sp
    first = slice(0, min(N_LEAD, Nx))
    ratio = ev["eig_ratio"].values
    summary = {
        "weights": str(path), "Nx": Nx, "Dt": model.Dt, "seed": seed, "cycles": K, "burn_in": B0,
        "snapshots": int(len(snap_idx)), "n_samples": b.n_samples, "innovation_scale": b.scale,
        "armse_dan": armse["dan"][0], "armse_dan_ci": armse["dan"][1],
        "armse_enkf": armse["enkf"][0], "armse_enkf_ci": armse["enkf"][1],
        "diverged_cycles": sim["diverged_cycles"],
        "b": ds_b.attrs["b"], "s": ds_b.attrs["s"],
        "pa_ls_vs_jacobian": float(ds_pa["rel_diff"].mean()), "ls_residual": float(ds_pa["ls_residual"].mean()),
        "asymmetry_jacobian": float(ds_pa["asymmetry_jacobian"].mean()), "asymmetry_ls": float(ds_pa["asymmetry_ls"].mean()),
        "min_eig_jacobian": float(ds_pa["min_eig_jacobian"].min()), "min_eig_ls": float(ds_pa["min_eig_ls"].min()),
        "frac_negative_min_eig_jacobian": float((ds_pa["min_eig_jacobian"] < 0).mean()),
        "eig_dan": [float(v) for v in ev["eig_dan"].values[first]],
        "eig_dan_ls": [float(v) for v in ev["eig_dan_ls"].values[first]],
        "eig_enkf": [float(v) for v in ev["eig_enkf"].values[first]],
        "eig_ratio": [float(v) for v in ratio[first]],
        "eig_ratio_trailing": _trailing_ratio(ev, N_LEAD),
        "trace_dan": float(ev["eig_dan"].sum()), "trace_enkf": float(ev["eig_enkf"].sum()),
        "sensitivity_extent": int(ds_se.attrs["extent"]), "sensitivity_extent_mean": int(ds_se.attrs["extent_mean"]),
        "sensitivity_extent_x": int(ds_se.attrs["extent_x"]),
        "sensitivity_extent_zeta": int(ds_se.attrs["extent_zeta"]), "sensitivity_snapshots": int(ds_se.attrs["snapshots"]),
        "sensitivity_ls_vs_jacobian": float(ds_se.attrs.get("ls_vs_jacobian", float("nan"))),
        "pa_extent_dan": sensitivity.extent(np.abs(ev["pa_row_dan"].values)),
        "pa_extent_enkf": sensitivity.extent(np.abs(ev["pa_row_enkf"].values)),
        "lyapunov_max": float(ds_ly["lyapunov"][0]), "lyapunov_positive": int(ds_ly.attrs["positive"]),
        "lyapunov_nonnegative": int(ds_ly.attrs["nonnegative"]), "lyapunov_sum": float(ds_ly["lyapunov"].sum()),
        "alignment_k": n0, "alignment_cos": float(cos_d.mean()), "alignment_cos_enkf": float(cos_e.mean()),
        "alignment_cos_random": rand,
        "errors": {f: {s: {m: float(ds_er[f"error_{m}"].sel(filter=f, stage=s)) for m in ("std", "skewness", "excess_kurtosis")}
                       for s in ("forecast", "analysis")} for f in ("dan", "enkf_n")},
        "code_version": code_version(), "threads": torch.get_num_threads(),
    }
    summary["wall_s"] = time.perf_counter() - t_start
    ds.attrs = {"title": "danlab analyse: what a_θ learned", "weights": str(path), "seed": seed, "Nx": Nx, "Dt": model.Dt,
                "cycles": K, "burn_in": B0, "enkf": "EnKF-N, N = 40, xN = 2", "code_version": summary["code_version"],
                "budget": str(asdict(b)), "b": summary["b"], "s": summary["s"],
                "sensitivity_extent": summary["sensitivity_extent"], "lyapunov_neutral_tol": tol,
                "alignment_random_baseline": rand}
    return ds, summary


def write_outputs(out: str | Path, ds: xr.Dataset, summary: dict) -> dict:
    """Write analysis.nc, the figures and summary.json into a temporary sibling of `out`, then move them in: a
    failure leaves `out` as it was. Returns the summary with `out` and `figures`."""
    from danlab.diagnostics import plots
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ds.to_netcdf(tmp / "analysis.nc")
        figures = plots.plot_all(ds, summary, tmp)
        summary = summary | {"out": str(out), "figures": figures}
        write_json(tmp / "summary.json", summary)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _number(flag: str, text, kind=int, minimum=None):
    """A command-line value as int/float, or a one-line ConfigError naming the flag."""
    if text is None:
        return None
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: expected {'an integer' if kind is int else 'a number'} (got {text!r})") from None
    if minimum is not None and v < minimum:
        raise ConfigError(f"{flag}: must be >= {minimum} (got {v})")
    return v


def command_line(a) -> str:
    """The command that reproduces a run (for the figures' captions), without --out/--json."""
    parts = ["danlab analyse", str(a.weights)]
    for flag, attr in (("--cycles", "cycles"), ("--burn-in", "burn_in"), ("--nx", "nx"), ("--np", "np"),
                       ("--innovation-scale", "innovation_scale"), ("--snapshots", "snapshots")):
        if getattr(a, attr, None) is not None:
            parts.append(f"{flag} {getattr(a, attr)}")
    if str(getattr(a, "seed", "0")) != "0":
        parts.append(f"--seed {a.seed}")
    if a.quick:
        parts.append("--quick")
    return " ".join(parts)


def analyse_command(a) -> dict:
    """`danlab analyse` from parsed arguments (values as given on the command line): validate, compute, write."""
    kw = dict(cycles=_number("--cycles", a.cycles, int, 2), burn_in=_number("--burn-in", a.burn_in, int, 0),
              nx=_number("--nx", a.nx, int, 8), n_samples=_number("--np", a.np, int, 2),
              scale=_number("--innovation-scale", a.innovation_scale, float), snapshots=_number("--snapshots", a.snapshots, int, 1))
    seed = _number("--seed", a.seed, int, 0)
    threads = _number("--threads", a.threads, int, 1)
    out = Path(a.out) if a.out else Path("runs") / f"analyse-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(out)  # a file, a system folder, an unwritable place: refused before any work
    prepare(a.weights, quick=a.quick, **kw)  # every input is checked before any work
    torch.set_num_threads(threads or 1)  # one thread unless asked: the cycled tensors are small (see DESIGN.md, Threads)
    ds, summary = analyse(a.weights, seed=seed, quick=a.quick, quiet=a.json, **kw)
    summary["command"] = command_line(a)
    return write_outputs(out, ds, summary)
