"""Training throughput of the reference a_θ (N_f 40, 5 blocks × 5 layers, kernel 5) in sample-cycles/s
(Nt × N_iter / step time), danlab's Trainer against a bare PyTorch loop of the same network and model,
measured in the same run; fp32 eager, bf16 autocast and torch.compile; and evaluation cycles/s.

    python benchmarks/train_throughput.py [--threads 2] [--Nt 256] [--N-iter 10] [--steps 5]

writes docs/results/train_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, provenance  # noqa: E402

from danlab.cycle import run_cycles  # noqa: E402
from danlab.learned import Learned  # noqa: E402
from danlab.models import Lorenz96  # noqa: E402
from danlab.nets import NetConfig, build_net  # noqa: E402
from danlab.observations import Observer  # noqa: E402
from danlab.training.train_config import TrainRunConfig  # noqa: E402
from danlab.training.trainer import Trainer  # noqa: E402
from danlab.twin import TwinStream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(Nt: int, N_iter: int, steps: int, bf16: bool, compile_: bool) -> float:
    """The same computation written as a plain PyTorch script: L96 RK4, noise, network, Adam."""
    torch.manual_seed(0)
    net = build_net(NetConfig())
    fnet = torch.compile(net) if compile_ else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def f(x):
        return (x.roll(-1, -1) - x.roll(2, -1)) * x.roll(1, -1) - x + 8.0

    def M(x, dt=0.05):
        k1 = f(x); k2 = f(x + dt / 2 * k1); k3 = f(x + dt / 2 * k2); k4 = f(x + dt * k3)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    x = 8 + torch.randn(Nt, 40, generator=g)
    for _ in range(1000):
        x = M(x)
    E = (x + torch.randn(Nt, 40, generator=g)).unsqueeze(1)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        loss = 0.0
        for _ in range(N_iter):
            x = M(x)
            y = x + torch.randn(Nt, 40, generator=g)
            Ef = M(E)
            with amp:
                dE = fnet(Ef, y - Ef.mean(1))
            E = Ef + dE.float()
            loss = loss + (E - x.unsqueeze(1)).pow(2).mean()
        opt.zero_grad()
        (loss / N_iter).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        E = E.detach()
        if s:  # the first step warms up (and compiles)
            times.append(time.perf_counter() - t0)
    return Nt * N_iter / (sum(times) / len(times))


def danlab_loop(Nt: int, N_iter: int, steps: int, bf16: bool, compile_: bool, teacher: float = 0.0) -> float:
    cfg = TrainRunConfig.model_validate({"train": {"Nt": Nt, "N_iter": N_iter, "bf16": bf16, "compile": compile_,
                                                   "teacher_weight": teacher}})
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        tr.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        return Nt * N_iter * steps / (time.perf_counter() - t0)


def train_flops_per_sample_cycle(cfg: NetConfig, Nx: int = 40) -> float:
    """Multiply-adds ×2 of the network's convolutions for one state, forward, ×3 for training (the backward pass
    computes the gradients of both the inputs and the weights); the L96 step (~4 × 10 Nx) is negligible."""
    cin = 1 if cfg.kind == "simplified" else 4
    layers = [(cin, cfg.Nf)] + [(cfg.Nf, cfg.Nf)] * (cfg.Nbl * cfg.Nl) + [(cfg.Nf, 1)]
    return 3 * sum(2 * a * b * cfg.kernel * Nx for a, b in layers)


def gemm_gflops(n: int = 1024, reps: int = 5) -> float:
    """The fp32 matrix-product rate this process gets now: the practical peak to compare against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def eval_speed(B: int, cycles: int = 300) -> float:
    net = build_net(NetConfig())
    m, o = Lorenz96(), Observer(40)
    ids = list(range(B))
    res = run_cycles(Learned.from_net(net.eval()), m, TwinStream(m, o, B, 0, ids=ids, dtype=torch.float32), cycles, 10, 0, ids=ids)
    return B * cycles / res.wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--Nt", type=int, default=256)
    ap.add_argument("--N-iter", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="skip bf16 (7x slower than fp32 where the CPU has no bf16 units)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    variants = [("fp32 eager", False, False), ("bf16 autocast", True, False)]
    if not a.no_compile:
        variants += [("fp32 torch.compile", False, True), ("bf16 + compile", True, True)]
    variants = [v for v in variants if not (a.no_bf16 and v[1])]
    for name, bf16, comp in variants:
        try:
            bare = bare_loop(a.Nt, a.N_iter, a.steps, bf16, comp)
            ours = danlab_loop(a.Nt, a.N_iter, a.steps, bf16, comp)
        except Exception as exc:  # torch.compile needs a C compiler; report rather than die
            print(f"{name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        rows.append({"variant": name, "danlab": ours, "bare": bare, "ratio": ours / bare})
        print(f"{name}: danlab {ours:.0f} sample-cycles/s, bare loop {bare:.0f}, ratio {ours / bare:.2f}", flush=True)
    teacher = danlab_loop(a.Nt, a.N_iter, a.steps, False, False, teacher=1.0)
    plain = next((r["danlab"] for r in rows if r["variant"] == "fp32 eager"), float("nan"))
    print(f"fp32 eager with the EnKF-N (N 40) teacher: {teacher:.0f} sample-cycles/s ({teacher / plain:.2f} of without)")
    flops, peak = train_flops_per_sample_cycle(NetConfig()), gemm_gflops()
    achieved = {r["variant"]: r["danlab"] * flops / 1e9 for r in rows}
    print(f"{flops / 1e6:.1f} MFLOP per training sample-cycle; fp32 GEMM now {peak:.1f} GFLOP/s; achieved", achieved)
    ev = {B: eval_speed(B) for B in (1, 8, 64)}
    print("evaluation experiment-cycles/s:", {k: round(v) for k, v in ev.items()})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps({"train": rows, "eval": ev, "Nt": a.Nt, "N_iter": a.N_iter, "teacher_fp32": teacher,
                                                            "train_flops_per_sample_cycle": flops, "gemm_gflops": peak,
                                                            "achieved_gflops": achieved}, indent=1) + "\n")
    table = markdown_table(["variant", "danlab sample-cycles/s", "bare PyTorch loop", "danlab / bare", "achieved GFLOP/s",
                            "of the fp32 GEMM rate"],
                           [[r["variant"], f"{r['danlab']:.0f}", f"{r['bare']:.0f}", f"{r['ratio']:.2f}",
                             f"{achieved[r['variant']]:.1f}", f"{achieved[r['variant']] / peak:.0%}"] for r in rows])
    text = (f"# Training throughput of the reference a_θ\n\nProduced by `{command_line()}` ({provenance()}).\n\n"
            f"Batch N_t = {a.Nt}, N_iter = {a.N_iter}; sample-cycles/s = N_t × N_iter / step time, mean of {a.steps} steps "
            f"after one warm-up step. The bare loop is the same network, model and optimiser written as a plain script.\n\n"
            + table + f"\nOne training sample-cycle of the reference network costs {flops / 1e6:.1f} MFLOP (its 27 "
            f"convolutions, forward and backward); an fp32 1024² matrix product ran at {peak:.1f} GFLOP/s in the same run. "
            f"With the EnKF-N (N 40) teacher cycled beside it (`train.teacher_weight`), fp32 training ran at {teacher:.0f} "
            f"sample-cycles/s ({teacher / plain:.2f} of the same loop without).\n"
            + "\nEvaluation (the trained-network filter in danlab's cycle loop, float32): "
            + ", ".join(f"B = {B}: {v:.0f} experiment-cycles/s" for B, v in ev.items()) + "\n")
    (out / "train_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
