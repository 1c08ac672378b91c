"""A/B timing of two versions of danlab's filters on one machine: ms per cycle of one experiment (threads 1) of the
EnKF-N (N 20, xN 2) and the IEnKF (lag 1, -N prior xN 2) on the standard Lorenz 96 twin, each version's `src/` run
in its own process, the two alternated `--runs` times; the median of each. On a shared VM whose speed drifts, only
the ratio of two versions measured this way in one run means something.

    git worktree add /tmp/base <old commit>
    python benchmarks/ab_speed.py /tmp/base/src src [--runs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# one process per timing: each version imports its own danlab; CPU time (process_time), best of 2 after a warm-up
SCRIPT = r"""
import json, sys, time, torch
from danlab.config import load_config
from danlab.experiments.run_config import RunConfig
from danlab.experiments.runner import simulate
torch.set_num_threads(1)
out = {}
for name, (f, over, K) in {"enkf_n": ("enkf_n.yaml", ["filter.N=20", "filter.xN=2"], 1500),
                           "ienks": ("ienks.yaml", ["filter.lag=1"], 600)}.items():
    cfg = load_config(RunConfig, sys.argv[1] + "/configs/l96/" + f,
                      ["burn_in=10", "batch=1", "seed=0", "threads=1"] + over + [f"cycles={K}"])
    simulate(cfg.model_copy(update={"cycles": 50}))
    best = 1e9
    for _ in range(2):
        t = time.process_time(); simulate(cfg); best = min(best, (time.process_time() - t) / K * 1e3)
    out[name] = best
print(json.dumps(out))
"""


def time_once(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS="1")
    # the configs of the same checkout as the src/ (a config key added since would be refused by older code)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(src).resolve().parent)], env=env, capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_src", help="the src/ folder of the version to compare against")
    ap.add_argument("new_src", help="the src/ folder of the version measured")
    ap.add_argument("--runs", type=int, default=6)
    a = ap.parse_args()
    runs = {"base": [], "new": []}
    for i in range(a.runs):
        for key, src in (("base", a.base_src), ("new", a.new_src)):
            runs[key].append(time_once(src))
            print(i, key, {m: round(v, 3) for m, v in runs[key][-1].items()}, flush=True)
    for m in runs["base"][0]:
        b, n = (statistics.median(r[m] for r in runs[k]) for k in ("base", "new"))
        print(f"{m}: {b:.2f} -> {n:.2f} ms per cycle (median of {a.runs}), {b / n:.2f} x")


if __name__ == "__main__":
    main()
