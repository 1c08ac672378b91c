"""Fit the gated gain of a training config's network by least squares, its body frozen at train.init_from.

    python scripts/fit_gate.py configs/l96/dan_nf40_gated.yaml --out runs/gate_ls [--rounds 3 --B 128 --cycles 300]

Each round cycles the network (with the gate fitted so far; none in round 0) as a filter on B fresh training
trajectories (seed + 1 + round: not the validation trajectories, nor the evaluation seeds), adds the rows of every
cycle after the burn-in to the normal equations of the earlier rounds, solves them (danlab.training.gate_fit) and
validates on the config's held-out validation trajectories (train.val_*). The network of the best validated round is
written to --out (model.json + safetensors, loadable by `danlab eval`), with fit.json: every round's figures, the
command, the code version and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from danlab.checkpoint import atomic_write_text, code_version
from danlab.config import load_config
from danlab.learned import load_net, save_net
from danlab.nets import build_net
from danlab.nets.cnn import gated
from danlab.rng import BatchRNG
from danlab.training.gate_fit import NormalEquations, design, hidden, pack, unpack
from danlab.training.train_config import TrainRunConfig
from danlab.training.trainer import validate
from danlab.twin import TwinStream


def collect(net, cfg: TrainRunConfig, ne: NormalEquations, B: int, cycles: int, burn_in: int, seed: int) -> dict:
    """Cycle the network on B trajectories, adding each cycle's rows after burn_in; its analysis RMSE there."""
    model, W, K = cfg.model.build(), net.cfg.gate, net.cfg.kernel
    twin = TwinStream(model, cfg.observations.build(cfg.model.Nx), B, seed, dtype=torch.float32)
    xa = twin.x + cfg.train.init_std * BatchRNG(seed, "init", B).randn(cfg.model.Nx, dtype=torch.float32)
    sq, n = 0.0, 0
    with torch.no_grad():
        for k in range(cycles):
            xf = model(xa)
            xt, obs = twin.step()
            zeta = obs.HtRinv_innovation(xf)
            h, base = hidden(net, xf.unsqueeze(1), zeta)
            if k >= burn_in:
                ne.add(design(h, zeta, W, K), (xt - xf - base[:, 0]).reshape(-1))
            xa = xf + base[:, 0] + gated(net.gate(h).view(B, 1, W, -1), zeta.unsqueeze(1))[:, 0]
            if not torch.isfinite(xa).all():
                raise FloatingPointError(f"round seed {seed}: the filter blew up at cycle {k}")
            if k >= burn_in:
                sq, n = sq + float(((xa - xt) ** 2).mean(-1).sqrt().sum()), n + B
    return {"train_armse": sq / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--B", type=int, default=128, help="trajectories per round")
    ap.add_argument("--cycles", type=int, default=300, help="cycles per round")
    ap.add_argument("--burn-in", type=int, default=50)
    ap.add_argument("--ridge", type=float, default=1e-4, help="relative to the features' mean square")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(TrainRunConfig, a.config)
    if not cfg.net.gate or not cfg.train.init_from:
        raise SystemExit(f"{a.config}: needs net.gate and train.init_from (the trained body the gate is fitted on)")
    if cfg.net.reflect or cfg.net.precision_input:  # the design matrix is of the plain layers' gated term only
        raise SystemExit(f"{a.config}: the least-squares gate takes a network without net.reflect and "
                         f"net.precision_input")
    t0 = time.time()
    body, body_meta = load_net(cfg.train.init_from)
    net = build_net(cfg.net)
    net.load_state_dict(body.state_dict(), strict=False)  # the gate alone is missing, and zero as built
    net.eval()
    val0 = validate(cfg, net)
    print(f"start (no gate): validation {val0[0]:.4f} ± {val0[1]:.4f}", flush=True)
    ne = NormalEquations(pack(net.gate).numel())
    rounds, best = [], (val0[0], pack(net.gate).clone(), -1)
    for r in range(a.rounds):
        stats = collect(net, cfg, ne, a.B, a.cycles, a.burn_in, a.seed + 1 + r)
        theta = ne.solve(a.ridge)
        unpack(theta, net.gate)
        val = validate(cfg, net)
        rounds.append({"round": r, "rows": ne.rows, "fit_mse_per_site": ne.mse(theta), "mse_without_gate": ne.rr / ne.rows,
                       "val_armse": val[0], "val_ci": val[1], "wall_s": round(time.time() - t0, 1), **stats})
        print(json.dumps(rounds[-1]), flush=True)
        if val[0] < best[0]:
            best = (val[0], theta.clone(), r)
    unpack(best[1], net.gate)
    out = Path(a.out)
    meta = {"trained_with": cfg.model_dump(mode="json"), "gate_fit": {
        "command": "python " + " ".join(sys.argv), "code_version": code_version(), "body": cfg.train.init_from,
        "body_val_armse": val0[0], "kept_round": best[2], "val_armse": best[0], "rounds": rounds,
        "wall_s": round(time.time() - t0, 1), "threads": a.threads, **{k: getattr(a, k) for k in
                                                                      ("B", "cycles", "burn_in", "ridge", "seed")}},
            "body_meta": {k: body_meta.get(k) for k in ("step", "val_armse", "code_version")}}
    save_net(out, net, meta)
    atomic_write_text(out / "fit.json", json.dumps(meta["gate_fit"], indent=1))
    print(f"kept round {best[2]}: validation {best[0]:.4f} (start {val0[0]:.4f}); written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
