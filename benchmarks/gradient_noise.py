"""Gradient noise scale of a training run at its checkpoint: how large a batch of trajectories the
gradient needs before more trajectories stop helping (McCandlish et al. 2018, "B_simple").

    python benchmarks/gradient_noise.py RUN_DIR [RUN_DIR ...] [--K 8] [--Nt 128] [--settle 300] [--threads 1]
        [--set train.teacher_weight=1 --name gradient_noise_teacher]

For each run: K independent batches of Nt trajectories (fresh seeds), settled into the network's own
filtering regime by `settle` cycles of the checkpoint's a_θ, then one gradient of the training loss (the
trainer's own window of N_iter cycles). With g_i the K batch gradients and ḡ their mean (batch K·Nt):
E|g_i|² = |G|² + tr(Σ)/Nt and E|ḡ|² = |G|² + tr(Σ)/(K·Nt) give the true gradient |G|² and the
per-trajectory noise tr(Σ); B_noise = tr(Σ)/|G|² (in trajectories of N_iter cycles). B_noise ≫ Nt: the
gradient is noise-dominated (larger batches help); B_noise ≪ Nt: every batch agrees, and a sharp
direction, not noise, is what the optimiser fights. Also per layer: the norm of ḡ and the agreement
(cosine) between two batches; and the precision of the gradient: each batch's window is replayed with the
other setting of bf16 autocast, and the norm of the difference is compared with |G| and with the batch noise
√(tr(Σ)/Nt). `--set` changes the loss measured (e.g. the teacher's target, `train.teacher_weight=1`, whose
teacher then settles with the network). Writes docs/results/<name>.{md,json} (default gradient_noise).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import command_line, markdown_table, provenance  # noqa: E402

from danlab.config import load_config  # noqa: E402
from danlab.io import atomic_write_text, write_json  # noqa: E402
from danlab.checkpoint import load_state_strict, read_checkpoint  # noqa: E402
from danlab.training.train_config import TrainRunConfig  # noqa: E402
from danlab.training.trainer import TRAIN_FORMAT, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _gradient(tr: Trainer) -> torch.Tensor:
    loss, _, _ = tr.window_loss()
    tr.net.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in tr.net.parameters()])


def batch_gradients(run_dir: Path, K: int, Nt: int, settle: int, threads: int,
                    extra: list[str] = ()) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int], int, bool]:
    """(K, P) gradients of the training loss at the run's checkpoint, from K independent batches, and the
    same K windows replayed with bf16 autocast switched the other way."""
    over = [f"train.Nt={Nt}", f"train.threads={threads}", "train.compile=false", *extra]
    tensors, meta = read_checkpoint(run_dir, "checkpoint", TRAIN_FORMAT)
    weights = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    grads, other = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(K):  # seeds 10,000 + s: none of them is a training or validation seed
            tr = Trainer(load_config(TrainRunConfig, run_dir / "config.yaml", over + [f"seed={10_000 + s}"], stored=True), tmp)
            load_state_strict(tr.net, weights, str(run_dir))
            with torch.no_grad():
                for _ in range(settle // tr.cfg.train.N_iter):
                    _, tr.E, _ = tr.window_loss()
            twin = copy.deepcopy(tr.twin.state_dict())  # window_loss advances the twin (and a teacher), not tr.E
            teacher = tr.E_teacher
            grads.append(_gradient(tr))
            tr.twin.load_state_dict(twin)
            tr.E_teacher = teacher
            bf16 = tr.cfg.train.bf16
            tr.cfg = tr.cfg.model_copy(update={"train": tr.cfg.train.model_copy(update={"bf16": not bf16})})
            other.append(_gradient(tr))
    names = [n for n, _ in tr.net.named_parameters()]
    return torch.stack(grads), torch.stack(other), names, [p.numel() for p in tr.net.parameters()], int(meta["step"]), bf16


def noise_scale(G: torch.Tensor, Nt: int) -> dict:
    K = G.shape[0]
    small, big = float(G.pow(2).sum(1).mean()), float(G.mean(0).pow(2).sum())
    g2 = (K * big - small) / (K - 1)
    trS = (small - big) / (1 / Nt - 1 / (K * Nt))
    return {"g2_batch": small, "g2_mean": big, "G2": g2, "trace_sigma": trS, "B_noise": trS / g2 if g2 > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="training run folders (with checkpoint.json)")
    ap.add_argument("--K", type=int, default=8, help="independent batches")
    ap.add_argument("--Nt", type=int, default=128, help="trajectories per batch")
    ap.add_argument("--settle", type=int, default=300, help="cycles of the checkpoint's filter before the gradient")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override for the loss measured")
    ap.add_argument("--name", default="gradient_noise", help="output file stem")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    if a.K < 2:
        ap.error("--K must be at least 2")
    torch.set_num_threads(a.threads)
    results, text = [], [f"# Gradient noise scale\n\nProduced by `{command_line()}` ({provenance()}).\n"]
    for run in a.runs:
        G, G_other, names, sizes, step, bf16 = batch_gradients(Path(run), a.K, a.Nt, a.settle, a.threads, a.set)
        ns = noise_scale(G, a.Nt)
        diff, bias = float((G - G_other).norm(dim=1).mean()), float((G - G_other).mean(0).norm())
        ns["precision"] = {"run_bf16": bf16, "grad_diff_norm": diff, "mean_grad_diff_norm": bias, "grad_norm": float(G.norm(dim=1).mean()),
                           "batch_noise_norm": (ns["trace_sigma"] / a.Nt) ** 0.5}
        layers, off = [], 0
        for n, size in zip(names, sizes):
            seg = G[:, off:off + size]
            off += size
            cos = float(torch.nn.functional.cosine_similarity(seg[0], seg[1], dim=0))
            layers.append({"param": n, "mean_grad_norm": float(seg.mean(0).norm()), "cos_two_batches": cos})
        results.append({"run": str(run), "overrides": a.set, "step": step, "K": a.K, "Nt": a.Nt, "settle": a.settle, **ns, "layers": layers})
        top = sorted(layers, key=lambda r: -r["mean_grad_norm"])[:6]
        text.append(f"\n## {run} (step {step}{', ' + ' '.join(a.set) if a.set else ''})\n\n|G| = {ns['G2'] ** 0.5:.4f}, tr(Σ) = {ns['trace_sigma']:.4g} per trajectory, "
                    f"**B_noise = {ns['B_noise']:.0f} trajectories** (batches of N_t = {a.Nt}, K = {a.K}, "
                    f"{a.settle} settling cycles).\n\nPrecision: the same windows with bf16 autocast "
                    f"{'off' if bf16 else 'on'} change the batch gradient by {diff:.3g} (norm, mean over the batches; the norm of the mean "
                    f"change, its systematic part, is {bias:.3g}, where random changes would give {diff / a.K ** 0.5:.3g}), "
                    f"against a batch gradient of norm {ns['precision']['grad_norm']:.3g}, |G| = {ns['G2'] ** 0.5:.3g} "
                    f"and a batch noise of {ns['precision']['batch_noise_norm']:.3g}.\n\nLargest mean-gradient parameters:\n\n")
        text.append(markdown_table(["parameter", "norm of the mean gradient", "cosine between two batches"],
                                   [[r["param"], r["mean_grad_norm"], r["cos_two_batches"]] for r in top]))
        print(f"{run}: step {step}, B_noise {ns['B_noise']:.1f} trajectories, |G| {ns['G2'] ** 0.5:.4f}, "
              f"bf16 vs fp32 gradient difference {diff:.3g}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{a.name}.json", {"command": command_line(), "results": results})
    atomic_write_text(out / f"{a.name}.md", "".join(text))


if __name__ == "__main__":
    main()
