"""Continue a training run (or start one) on a GPU for a fixed wall-clock budget, at the batch size that trains fastest.

A GPU lease is short (minutes) and its step time is not known in advance, so this script measures it
before it commits to a schedule:

1. copies RUN (a run folder: checkpoint, config, metrics) to OUT/run; or, RUN being a training config file
   (YAML), starts a fresh run there with that config and the --set knobs;
2. times a few training steps at each candidate batch size N_t, and one validation, on the device;
3. picks the N_t that maximises the number of *effective* steps in the budget,
   steps(N_t) × N_t / (N_t + B_noise), where B_noise is the gradient-noise scale measured by
   benchmarks/gradient_noise.py (docs/results/gradient_noise.md): beyond B_noise a larger batch
   barely helps, below it each step is noise-dominated;
4. resumes the run there as a warm restart (`danlab train --resume` with the new N_t, device and
   schedule; the batch grows with fresh trajectories, see Trainer.load): the body learning rate
   jumps to --peak-lr and decays by the cosine's tail to lr_min at the last step, which is placed so
   that the run, its validations included, ends within the budget;
   A fresh run keeps its config's schedule (warm-up, lr, cosine to lr_min), with max_steps placed the same way;
   its step time is timed on the N_iter-cycle windows (distillation steps, if any, are cheaper);
5. saves the final (averaged) network to OUT/final beside the run's best.

The run stops at the budget in any case (Trainer.run's max_wall_s), checkpointed, even if the timing was off.

    python scripts/gpu_continue.py RUN OUT [--budget-s 450] [--peak-lr 1e-4] [--nt 1024,2048,4096,8192]
    python scripts/gpu_continue.py CONFIG.yaml OUT [--budget-s 450] [--nt 32,64] [--set train.distill_steps=300 ...]

Everything it decides is printed as one JSON line at the end (and recorded by the run's own schedule
history), so the continuation is reproduced by `danlab train --resume OUT/run --set ...` with those knobs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from danlab.config import load_config
from danlab.learned import save_net
from danlab.training.train_config import TrainRunConfig
from danlab.training.trainer import Trainer, lr_at, train, validate


def run_files(src: Path, dest: Path) -> None:
    """The resumable state of a run folder: config, metrics, checkpoint sidecar and tensors."""
    dest.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "checkpoint.json").read_text())
    for name in ("config.yaml", "metrics.csv", "checkpoint.json", meta["tensors"]):
        shutil.copy2(src / name, dest / name)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(run: Path, sets: list[str], warm: int, timed: int, fresh: Path | None = None) -> tuple[float, float, float]:
    """Seconds per training step and per validation, and the validation aRMSE, at these settings (on a throwaway
    copy of the run, or a fresh run of config `fresh` timed on its windows, whose checkpoint is also written once:
    the whole path runs on the device before the real run)."""
    with tempfile.TemporaryDirectory() as tmp:
        if fresh is None:
            run_files(run, Path(tmp))
            cfg = load_config(TrainRunConfig, Path(tmp) / "config.yaml", sets, stored=True)
            tr = Trainer(cfg, tmp)
            tr.load()
        else:
            cfg = load_config(TrainRunConfig, fresh, sets + ["train.distill_steps=0", "train.teacher_weight=0"])
            tr = Trainer(cfg, tmp)
        for _ in range(warm):
            tr.train_step()
        sync(cfg.train.device)
        t0 = time.perf_counter()
        for _ in range(timed):
            loss = tr.train_step()[0]
        sync(cfg.train.device)
        t_step = (time.perf_counter() - t0) / timed
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss while timing with {sets}")
        t0 = time.perf_counter()
        va, _ = validate(cfg, tr.kept)
        t_val = time.perf_counter() - t0
        tr.save()  # the checkpoint path works on this device too
    return t_step, t_val, va


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock seconds of training, validations included")
    p.add_argument("--peak-lr", type=float, default=1e-4, help="body learning rate at the restart")
    p.add_argument("--nt", default="1024,2048,4096,8192", help="candidate batch sizes")
    p.add_argument("--b-noise", type=float, default=5000.0, help="gradient-noise scale (trajectories)")
    p.add_argument("--vals", type=int, default=8, help="validations during the continuation")
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a fresh run's config overrides (RUN a config file)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    run = a.out / "run"
    fresh = a.run if a.run.is_file() else None
    if fresh is None:
        if a.sets:
            raise SystemExit("gpu_continue: --set configures a fresh run (RUN a config file); a continuation keeps its run's config")
        run_files(a.run, run)
    base = [f"train.device={a.device}", f"train.threads={a.threads}", "train.bf16=false", "train.compile=false"]
    if fresh is None:
        cfg0 = load_config(TrainRunConfig, run / "config.yaml", base, stored=True)
    else:
        base = a.sets + base
        cfg0 = load_config(TrainRunConfig, fresh, base)
    timing = {}
    for nt in [int(s) for s in a.nt.split(",")]:
        try:
            t_step, t_val, va = time_steps(run, base + [f"train.Nt={nt}"], a.warm, a.timed, fresh=fresh)
        except torch.OutOfMemoryError:
            print(json.dumps({"Nt": nt, "skipped": "out of device memory"}), flush=True)
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        timing[nt] = {"s_per_step": t_step, "s_per_val": t_val, "sample_cycles_per_s": nt * cfg0.train.N_iter / t_step,
                      "val_armse": va}
        print(json.dumps({"Nt": nt, "s_per_step": round(t_step, 4), "s_per_validation": round(t_val, 2),
                          "val_armse_at_start": round(va, 4)}), flush=True)
    start, wall0 = 0, 0.0
    if fresh is None:
        meta = json.loads((run / "checkpoint.json").read_text())
        start, wall0 = meta["step"], meta["wall_s"]

    def plan(nt: int) -> tuple[int, int, float]:
        """(steps, val_every, effective steps) for batch nt within the budget."""
        t = timing[nt]
        # up to vals + 1 validations (multiples of val_every, and the last step), each of the averaged network and
        # of the raw one, and the final one here
        n = int((a.budget_s - (2 * a.vals + 3) * t["s_per_val"]) / t["s_per_step"])
        return n, max(n // a.vals, 1), n * nt / (nt + a.b_noise)

    if not timing:
        raise SystemExit("gpu_continue: no candidate batch size fits on the device")
    for nt, t in timing.items():
        t["plan_steps"], _, t["effective_steps"] = plan(nt)
    nt = max(timing, key=lambda k: timing[k]["effective_steps"])
    n, val_every, _ = plan(nt)
    if n < 100:
        raise SystemExit(f"gpu_continue: only {n} steps fit in the budget; give more --budget-s")
    steps = start + n
    if fresh is None:
        # lr_at's cosine runs from the warm-up to `steps`; choose its lr so that the body gets peak-lr at `start`
        probe = cfg0.train.model_copy(update={"max_steps": steps, "lr": 1.0, "lr_min": 0.0})
        frac = lr_at(start, probe)
        lr = cfg0.train.lr_min + (a.peak_lr - cfg0.train.lr_min) / frac
    else:
        lr = cfg0.train.lr
    sets = base + [f"train.Nt={nt}", f"train.max_steps={steps}", f"train.lr={lr:.6g}", f"train.val_every={val_every}",
                   "train.checkpoint_every_s=60"]
    print(json.dumps({"chosen_Nt": nt, "steps": steps, "lr": float(f"{lr:.6g}"), "val_every": val_every,
                      "budget_s": a.budget_s}), flush=True)
    cfg = load_config(TrainRunConfig, fresh or run / "config.yaml", sets, stored=fresh is None)
    t0 = time.perf_counter()
    # whatever the timing said, the training stops within its budget (checkpointed, validated there)
    result = train(cfg, run, resume=fresh is None, progress=False, max_wall_s=wall0 + a.budget_s)
    wall = time.perf_counter() - t0
    tr = Trainer(cfg, run)
    tr.load()
    va, ci = validate(cfg, tr.kept)
    save_net(a.out / "final", tr.kept, tr.provenance(va, ci))
    print(json.dumps({"result": result, "final_val_armse": va, "final_val_ci": ci, "train_wall_s": round(wall, 1),
                      "total_s": round(time.perf_counter() - t_start, 1), "timing": timing,
                      "set": sets, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
                      "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
