"""The cost of Dask's MALLOC_TRIM_THRESHOLD_ to a training step, and what our LocalCluster's workers get.

    python benchmarks/sweep_worker_env.py [--steps 60 --reps 2]

Dask's nannies start each worker with MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ). Setting
it turns off glibc's adaptive mmap threshold, so every allocation above 128 KiB (most of a training step's
tensors) is mmapped, page-faulted in and unmapped again each time. This times the same short training
(`danlab train configs/l96/dan_fast.yaml`, no distillation, no validation, one thread) in fresh processes with and
without the variable, interleaved, the fastest of the repetitions kept, and asks a LocalCluster made by
danlab.experiments.sweep what its workers' environment holds. Writes docs/results/sweep_worker_env.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, cpu_model, markdown_table, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAR = "MALLOC_TRIM_THRESHOLD_"


def timed_training(steps: int, trim: bool) -> dict:
    """Wall and CPU (user, system) seconds of `steps` training steps in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != VAR} | {"OMP_NUM_THREADS": "1"} | ({VAR: "65536"} if trim else {})
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "danlab.cli", "train", str(ROOT / "configs/l96/dan_fast.yaml"), "--out",
               f"{tmp}/run", "--set", "train.distill_steps=0", "--set", "train.threads=1", "--set",
               "train.val_every=100000", "--set", "train.val_every_s=1e9", "--stop-after", str(steps), "--quiet"]
        before = os.times()
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        after = os.times()
        result = json.loads((Path(tmp) / "run" / "checkpoint.json").read_text())
    return {"wall_s": wall, "train_wall_s": float(result["wall_s"]),
            "user_s": after.children_user - before.children_user,
            "system_s": after.children_system - before.children_system}


def worker_env() -> dict:
    from danlab.experiments.sweep import _client
    client, close = _client(None, 1)
    try:
        return next(iter(client.run(lambda: {k: os.environ.get(k) for k in (VAR, "OMP_NUM_THREADS")}).values()))
    finally:
        close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    runs = {True: [], False: []}
    for _ in range(a.reps):
        for trim in (True, False):
            runs[trim].append(timed_training(a.steps, trim))
            print(trim, runs[trim][-1], flush=True)
    best = {trim: min(r, key=lambda x: x["train_wall_s"]) for trim, r in runs.items()}
    ratio = best[True]["train_wall_s"] / best[False]["train_wall_s"]
    env = worker_env()
    rows = [[f"{VAR}=65536 (Dask's default for its workers)" if trim else "unset (glibc's default, our workers)",
             best[trim]["train_wall_s"], best[trim]["train_wall_s"] / a.steps, best[trim]["user_s"], best[trim]["system_s"]]
            for trim in (True, False)]
    rec = {"command": command_line(), "provenance": provenance(), "cpu": cpu_model(), "steps": a.steps, "reps": a.reps,
           "runs": {str(k): v for k, v in runs.items()}, "slowdown": ratio, "sweep_worker_env": env}
    out = Path(a.out)
    (out / "sweep_worker_env.json").write_text(json.dumps(rec, indent=1))
    md = [f"# Dask's {VAR} and a training step\n\n", f"Command: `{rec['command']}`  \n{rec['provenance']}\n\n",
          f"{a.steps} steps of `configs/l96/dan_fast.yaml` (windows only: N_t 128 × N_iter 10, one thread, no "
          f"validation) in a fresh process each, {a.reps} interleaved repetitions, the fastest kept:\n\n",
          markdown_table(["worker environment", "training s", "s per step", "user CPU s (whole process)",
                          "system CPU s (whole process)"], rows),
          f"\nWith the variable a step takes **{ratio:.2f}×** as long. A LocalCluster started by `danlab sweep` now "
          f"gives its workers: `{env}`.\n"]
    (out / "sweep_worker_env.md").write_text("".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
