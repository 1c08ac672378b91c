"""Export the best network of a training run as shippable weights with their provenance.

`danlab export RUN_DIR weights/NAME` copies the run's best network (weights + sidecar), evaluates it
as a filter on held-out trajectories, and writes beside it (all of it in a temporary folder first, renamed
into place when complete: see `export`): provenance.json (training config, seed, code
version, wall time, step, the measured score and the command that measures it), the training curve
(metrics.csv and curve.png: validation aRMSE against wall-clock time) and a short README.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from danlab.checkpoint import CheckpointError
from danlab.config import load_config, model_config
from danlab.experiments.run_config import RunConfig, learned_eval_data
from danlab.experiments.runner import run_experiment
from danlab.io import atomic_write_text, check_output_dir, code_version, write_json
from danlab.learned import load_net, resolve_net_dir
from danlab.training.trainer import plot_curve


def _code_sessions(meta: dict) -> str:
    """The training's code version, or each session's when a resumed run changed it: "A (from step 0), B (from step s)"."""
    sessions = meta.get("code_versions") or []
    if len(sessions) < 2:
        return meta["code_version"]
    return ", ".join(f"{v['code']} (from step {v['step']})" for v in sessions)


def export(run_dir: str | Path, dest: str | Path, cycles: int = 10_000, burn_in: int = 500, batch: int = 8,
           seed: int = 0) -> dict:
    """Export never deletes or half-writes: everything is written to a temporary folder beside `dest` and
    renamed into place only once complete (the whole folder when `dest` is new; file by file, each an atomic
    rename, into an existing `dest`, whose other files, e.g. a shipped run/, are kept). A failure at any point
    leaves `dest` as it was."""
    run_dir, dest = Path(run_dir), Path(dest)
    src = resolve_net_dir(run_dir)
    net, meta = load_net(src)  # refuses a corrupt network before anything is written
    if not (run_dir / "metrics.csv").is_file():
        raise CheckpointError(f"{run_dir}: no metrics.csv: not a training run folder")
    for what, path in (("the training run folder", run_dir), ("the network it exports", src)):
        if os.path.realpath(dest) == os.path.realpath(path):
            raise CheckpointError(f"{dest}: is {what} ({path}): export into another folder")
    check_output_dir(dest, "export destination")
    trained = meta.get("trained_with", {})
    missing = [k for k in ("seed", "model", "observations", "net", "train") if k not in trained]
    missing += [k for k in ("step", "wall_s", "code_version", "val_armse", "val_ci", "val_setup") if k not in meta]
    if missing:
        raise CheckpointError(f"{src}/model.json: not the network of a training run (no {missing[0]} in its sidecar)")
    tmp = dest.parent / f".{dest.name}.export-tmp-{os.getpid()}"
    # the evaluation config, validated before anything is written (e.g. --cycles 0 is refused here)
    eval_cfg = load_config(RunConfig, data=learned_eval_data(trained, tmp, seed=seed, cycles=cycles, burn_in=burn_in,
                                                             batch=batch))
    created = [d for d in [dest.parent, *dest.parent.parents] if not d.exists()]  # removed again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ok = False
    try:
        prov = _export_into(tmp, dest, run_dir, src, meta, eval_cfg, cycles, burn_in, batch, seed)
        _install(tmp, dest, meta["tensors"])
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for d in created:  # innermost first
                try:
                    d.rmdir()
                except OSError:
                    break
    return prov


def _install(tmp: Path, dest: Path, tensors: str) -> None:
    """Move the finished export in `tmp` into `dest`: one rename when `dest` is new; else each file by an
    atomic rename, the tensor file first and the sidecar that names it after, then the superseded tensor files
    of the previous export (no longer named by any sidecar) are removed. Nothing else in `dest` is touched."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    names = sorted(f.name for f in tmp.iterdir())
    order = [tensors, "model.json"] + [n for n in names if n not in (tensors, "model.json")]
    for name in order:
        os.replace(tmp / name, dest / name)
    for old in dest.glob("model-*.safetensors"):
        if old.name != tensors:
            old.unlink(missing_ok=True)


def _export_into(out: Path, dest: Path, run_dir: Path, src: Path, meta: dict, eval_cfg, cycles: int, burn_in: int,
                 batch: int, seed: int) -> dict:
    """Write the export of `src` (the network of `run_dir`) into the folder `out`, named after `dest`."""
    shutil.copy2(src / "model.json", out / "model.json")
    shutil.copy2(src / meta["tensors"], out / meta["tensors"])
    load_net(out)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    trained = meta["trained_with"]
    score = run_experiment(eval_cfg, None)
    v = metrics.dropna(subset=["val_armse"])
    curve = [{"wall_min": round(w / 60, 2), "step": int(s), "val_armse": round(a, 4)}
             for w, s, a in zip(v["wall_s"], v["step"], v["val_armse"])]
    prov = {
        "weights": dest.name, "trained_with": trained, "seed": trained["seed"], "step": meta["step"],
        "training_wall_s": meta["wall_s"], "training_code_version": meta["code_version"],
        "training_code_versions": meta.get("code_versions"),
        "training_threads": meta.get("threads"), "training_device": meta.get("device"),
        "validation": {"armse": meta["val_armse"], "ci": meta["val_ci"], **meta["val_setup"]},
        "schedule_history": meta.get("schedule_history", []),
        "evaluation": {"armse": score["armse"], "armse_ci": score["armse_ci"], "spread": score["spread"],
                       "cycles": cycles, "burn_in": burn_in, "trajectories": batch, "seed": seed,
                       "n_diverged": score["n_diverged"], "cycles_per_s": score["cycles_per_s"],
                       **({k: score[k] for k in ("spread_ratio", "rank_hist")} if "rank_hist" in score else {}),
                       "command": f"danlab eval {dest} --cycles {cycles} --burn-in {burn_in} --batch {batch} --seed {seed} --json"},
        "curve": curve, "exported_by_code_version": code_version(),
    }
    write_json(out / "provenance.json", prov)
    plot_curve(metrics, out / "curve.png", f"{dest.name}: validation aRMSE during training")
    t = trained["train"]
    model_cfg = model_config(trained["model"])
    atomic_write_text(out / "README.md", (
        f"# {dest.name}\n\nLearned analysis a_θ ({trained['net']['kind']}, N_f {trained['net']['Nf']}, "
        f"{trained['net']['Nbl']} blocks × {trained['net']['Nl']} layers, kernel {trained['net']['kernel']}"
        f"{', the observation precision as a fifth input' if trained['net'].get('precision_input') else ''}"
        f"{f', a gated gain {g} sites wide' if (g := trained['net'].get('gate')) else ''}), Ne = {t['N']}, "
        f"trained on the model {model_cfg.name} ({', '.join(f'{k} {v}' for k, v in model_cfg.model_dump().items() if k != 'name')}, "
        f"Δt {model_cfg.Dt:g}, "
        f"{trained['observations']['kind']} observations, σ = {trained['observations']['sigma']}).\n\n"
        f"- trained: {meta['step']} steps of N_t = {t['Nt']} trajectories × N_iter = {t['N_iter']} cycles, "
        f"{meta['wall_s'] / 3600:.2f} h wall-clock on {meta.get('device', 'cpu')} ({meta.get('threads')} threads), seed {trained['seed']}, "
        f"code {_code_sessions(meta)}\n"
        + ("- trained from the observations alone (loss semisupervised, eq. 15): no truth reached the loss, the resets or "
           "the choice of the kept network (the latest)\n" if t.get("loss") == "semisupervised" else "")
        + (f"- started from the weights of `{t['init_from']}` (train.init_from)\n" if t.get("init_from") else "")
        + (f"- trained with the fair {'energy score' if t['loss'] == 'energy' else 'CRPS'} of its {t['N']} members against "
           f"the truth, each member's own innovation taken against observations perturbed by {t.get('perturb_obs', 0)} × "
           f"N(0, R) (train.perturb_obs, kept for its evaluation); spread {score['spread']:.4f}, "
           f"{score['spread_ratio']:.2f} × the aRMSE\n" if t.get("loss") in ("energy", "crps") else "")
        + f"- aRMSE {score['armse']:.4f} ± {score['armse_ci']:.4f} over {batch} held-out trajectories × {cycles} cycles "
        f"after {burn_in} of burn-in: `{prov['evaluation']['command']}`\n"
        + (f"- the weights are the exponential moving average of the trained ones (decay {t['ema']} per step)\n"
           if t.get("ema") else "")
        + "".join(f"- resumed at step {h['step']} with a new schedule: "
                  + ", ".join(f"{k} = {v}" for k, v in h["set"].items()) + "\n" for h in prov["schedule_history"])
        + "- training curve: `curve.png`, `metrics.csv`; everything else: `provenance.json`\n"))
    return prov
