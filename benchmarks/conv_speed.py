"""Is the training cost of a sample-cycle in the convolutions' implementation or in their FLOPs? Forward and
backward of a stack of circular convolutions shaped like the reference a_θ (27 layers, N_f 40, kernel 5, Nx 40,
residual + GELU) on N_t states, timed for nn.functional.conv1d after circular padding (what nn.Conv1d does), after
concatenating the wrapped edges, and as the inference path's gather of the k shifts followed by a matrix product
(einsum, or a plain matmul). All variants are timed in one run, interleaved, best of the repeats.

    python benchmarks/conv_speed.py [--threads 1] [--batch 128] [--repeats 6]

writes docs/results/conv_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def variants(B: int, C: int, Nx: int, k: int) -> dict:
    idx = (torch.arange(Nx)[None] + torch.arange(k)[:, None] - k // 2) % Nx  # (k, Nx): the circular shifts

    def pad(h, w, b):
        return F.conv1d(F.pad(h, (k // 2, k // 2), mode="circular"), w, b)

    def cat(h, w, b):
        return F.conv1d(torch.cat([h[..., -(k // 2):], h, h[..., :k // 2]], -1), w, b)

    def gather_einsum(h, w, b):
        return torch.einsum("ock,bckx->box", w, h[:, :, idx]) + b[:, None]

    def gather_matmul(h, w, b):
        cols = h[:, :, idx].permute(0, 3, 1, 2).reshape(B * Nx, C * k)
        return (cols @ w.view(C, -1).t() + b).view(B, Nx, C).transpose(1, 2)

    return {"conv1d, circular pad": pad, "conv1d, concatenated edges": cat, "gather + einsum": gather_einsum,
            "gather + matmul": gather_matmul}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "conv_speed"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    B, C, Nx, k = a.batch, 40, 40, 5
    g = torch.Generator().manual_seed(0)
    ws = [(0.05 * torch.randn(C, C, k, generator=g)).requires_grad_() for _ in range(a.layers)]
    bs = [torch.zeros(C, requires_grad=True) for _ in range(a.layers)]
    x0 = torch.randn(B, C, Nx, generator=g)
    fns = variants(B, C, Nx, k)

    def stack(conv):
        h = x0
        for w, b in zip(ws, bs):
            h = F.gelu(conv(h, w, b)) + h
        return h

    with torch.no_grad():
        ref = stack(fns["conv1d, circular pad"])
        err = {n: float((stack(f) - ref).abs().max()) for n, f in fns.items()}
    times = {n: [] for n in fns}
    for _ in range(a.repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            stack(f).pow(2).mean().backward()
            times[n].append(time.perf_counter() - t0)
    flop = 3 * 2 * B * C * C * k * Nx * a.layers  # forward + backward ≈ 3 × the forward's multiply-adds × 2
    base = min(times["conv1d, circular pad"][1:])
    rows = [{"variant": n, "ms": 1e3 * min(t[1:]), "gflop_s": flop / min(t[1:]) / 1e9, "vs_conv1d": min(t[1:]) / base,
             "max_abs_diff": err[n]} for n, t in times.items()]
    header = (f"# Convolution implementations for training (forward + backward of {a.layers} circular convolutions, "
              f"N_f {C}, kernel {k}, Nx {Nx}, {B} states, {a.threads} thread(s))\n\n"
              f"Produced by `{command_line()}` ({provenance()}). Best of {a.repeats - 1} timed repeats after one, "
              "all variants interleaved in one run: compare the ratios, not the absolute times, on a loaded machine.\n\n")
    text = header + markdown_table(["variant", "ms", "GFLOP/s", "time / conv1d", "max |diff| vs conv1d"],
                                   [[r["variant"], round(r["ms"], 1), round(r["gflop_s"], 2), round(r["vs_conv1d"], 2),
                                     f"{r['max_abs_diff']:.1e}"] for r in rows])
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "command": command_line(), "code": provenance()}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
