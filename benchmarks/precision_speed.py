"""fp32 against bf16 autocast for one forward + backward pass of the reference a_θ on a batch of states, in the same
process: whether bf16 pays on this CPU (it does with AMX; without bf16 units it is emulated and much slower).

    python benchmarks/precision_speed.py [--batch 128] [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from danlab.nets import NetConfig, build_net


def seconds(net, E, zeta, bf16: bool, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(E, zeta)
        out.float().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    net = build_net(NetConfig())
    E, zeta = torch.randn(a.batch, 1, 40, generator=g), torch.randn(a.batch, 40, generator=g)
    fp32, bf16 = seconds(net, E, zeta, False, a.reps), seconds(net, E, zeta, True, a.reps)
    print(json.dumps({"batch": a.batch, "threads": a.threads, "fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4),
                      "bf16_over_fp32": round(bf16 / fp32, 2)}))


if __name__ == "__main__":
    main()
