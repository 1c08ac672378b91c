"""Truth, observations, forecast and analysis on the sphere for one cycle of a filter on the QG twin (issue 18).

Runs the filter of a run config (default configs/qg/enkf_n.yaml), or the learned a_θ of a weights folder
(`--weights`, on the twin it was trained on), for `--cycles` cycles on its twin (the same seeds, truth and
observations as `danlab run` and `danlab eval`) and draws, at the last cycle, four maps: the truth ψ, the
observations (the observed grid points coloured by their value), the analysis mean and its error, with the RMSE
of the forecast and the analysis in the titles. Writes docs/results/qg_maps.png.

    nice -n 15 .venv/bin/python benchmarks/qg_maps.py [--config configs/qg/enkf_n.yaml] [--cycles 60] [--set k=v]
    nice -n 15 .venv/bin/python benchmarks/qg_maps.py --weights weights/qg_ne1 --out docs/results/qg_maps_dan.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from danlab.config import load_config  # noqa: E402
from danlab.cycle import initial_ensemble  # noqa: E402
from danlab.experiments.run_config import RunConfig, learned_eval_data  # noqa: E402
from danlab.learned import load_net, resolve_net_dir  # noqa: E402
from danlab.metrics import rmse  # noqa: E402
from danlab.rng import BatchRNG  # noqa: E402
from danlab.twin import TwinStream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "qg" / "enkf_n.yaml"))
    p.add_argument("--cycles", type=int, default=60)
    p.add_argument("--weights", type=Path, help="a trained network (folder) to run instead of --config's filter")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "qg_maps.png")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.weights is None:
        cfg = load_config(RunConfig, a.config, a.set + ["batch=1"])
    else:
        trained = load_net(a.weights)[1].get("trained_with", {})
        cfg = load_config(RunConfig, data=learned_eval_data(trained, str(resolve_net_dir(a.weights)), cycles=a.cycles,
                                                            burn_in=0, batch=1), overrides=a.set)
    model = cfg.model.build()
    observer = cfg.observations.build(model.Nx)
    filt = cfg.filter.prepare(model, observer, cfg.torch_dtype, cfg.device)
    twin = TwinStream(model, observer, 1, cfg.seed, ids=[0], dtype=cfg.torch_dtype)
    E = initial_ensemble(twin.x, filt.N, BatchRNG(cfg.seed, "init", 1, [0]), cfg.init_std)
    rng = BatchRNG(cfg.seed, "filter", 1, [0])
    carry = filt.start(E)
    with torch.no_grad():
        for _ in range(a.cycles):
            x, obs = twin.step()
            carry, Ef, E, _, _ = filt.step(carry, model, obs, rng)
    shape = model.grid_shape
    lat, lon = (np.degrees(v.numpy()) for v in (model.sht.lat, model.sht.lon))
    truth, xa, xf = (v[0].view(shape).numpy() for v in (x, E.mean(-2), Ef.mean(-2)))
    mask = obs.mask[0].view(shape).numpy() > 0
    vmax = np.abs(truth).max()
    fig, ax = plt.subplots(2, 2, figsize=(12, 6.6), sharex=True, sharey=True, layout="constrained")
    kw = dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="nearest")
    im = ax[0, 0].pcolormesh(lon, lat, truth, **kw)
    ax[0, 0].set_title(f"truth ψ, cycle {a.cycles} (day {a.cycles * model.Dt:g})")
    LON, LAT = np.meshgrid(lon, lat)
    ax[0, 1].scatter(LON[mask], LAT[mask], c=obs.y[0].view(shape).numpy()[mask], cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                     s=14, edgecolors="k", linewidths=0.2)
    ax[0, 1].set_title(f"{int(mask.sum())} observations (σ = {obs.sigma:g})")
    ax[1, 0].pcolormesh(lon, lat, xa, **kw)
    ax[1, 0].set_title(f"analysis mean ({cfg.filter.method}, N = {filt.N}): RMSE {float(rmse(E.mean(-2), x)[0]):.3f} "
                       f"(forecast {float(rmse(Ef.mean(-2), x)[0]):.3f})")
    err = xa - truth
    e = np.abs(err).max()
    im2 = ax[1, 1].pcolormesh(lon, lat, err, cmap="PuOr_r", vmin=-e, vmax=e, shading="nearest")
    ax[1, 1].set_title("analysis error")
    for a_ in ax.flat:
        a_.set_xlim(lon[0] - 2.8, lon[-1] + 2.8)
    for a_ in ax[1]:
        a_.set_xlabel("longitude (°)")
    for a_ in ax[:, 0]:
        a_.set_ylabel("latitude (°)")
    fig.colorbar(im, ax=ax[0, 1], label="ψ (10⁷ m² s⁻¹)")
    fig.colorbar(im, ax=ax[1, 0], label="ψ (10⁷ m² s⁻¹)")
    fig.colorbar(im2, ax=ax[1, 1], label="error (10⁷ m² s⁻¹)")
    cmd = "nice -n 15 .venv/bin/python benchmarks/qg_maps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    fig.suptitle(cmd, fontsize=7, color="0.4", x=0.01, y=0.0, ha="left", va="bottom")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return a.out


if __name__ == "__main__":
    main()
