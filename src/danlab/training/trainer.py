"""Truncated backpropagation through time over chained DA cycles, truth and observations online.

One step: N_iter cycles from the carried-over analyses, each a forecast through the differentiable
model followed by the learned analysis; the loss is averaged over the cycles, trajectories and members
and backpropagated through all of them (model included); the analyses carry over detached.

Stability from the first step: the network starts as a gain g0 on zeta plus a zero-initialised CNN
(see nets/cnn.py), i.e. a stable nudging filter. On top of it, any trajectory whose analysis turns
non-finite or drifts beyond `reset_factor` times the truth's spread is reset around its truth (from a
seeded stream, so a resumed run draws the same resets); a step with a non-finite loss is skipped.

Teacher targets (`teacher_weight` w > 0): a classical EnKF-N is cycled on the same truth and
observations as the training trajectories, and the supervised target becomes w x̄^a_teacher + (1 - w) x.
Both the teacher's mean and a_θ's analysis are functions of the same observations, so if the teacher were
the exact posterior mean E[x_k | y_1:k], regressing on it would have the same minimiser as regressing on the
truth (the tower property), while its residual, hence the gradient noise, is smaller: measured with the
shipped network on standard L96, the truth lies 0.20 from its analysis and the mean of an EnKF-N with 40
members 0.115, and the per-trajectory gradient noise is 3.7 times smaller. The price is the teacher's own
suboptimality (at the shipped network the teacher's loss still has a gradient of norm 0.064), which w < 1
(or w = 0 at the end of a run) trades off.

Distillation (`distill_steps` > 0): the first optimiser steps are single cycles instead of N_iter-cycle
windows: a_θ analyses the teacher's forecast mean (its first Ne members when Ne > 1) and the forecast of its
own carried state, both regressed on the teacher's analysis mean (whatever teacher_weight says for the
windows), with no backpropagation through the model: a cheap warm start (see `distill_loss`). The windows
then start from the carried states; with teacher_weight 0 they target the truth and no teacher is cycled.

Semi-supervised (`loss: semisupervised`): observations only, see `semisupervised_window_loss`.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from danlab.checkpoint import (CheckpointError, atomic_write_text, code_version, load_state_strict, read_checkpoint,
                               write_checkpoint)
from danlab.config import ConfigError, to_yaml, upgrade_renamed
from danlab.cycle import divergence_threshold, initial_ensemble, lost, run_cycles
from danlab.filters.ensemble import EnKF_N
from danlab.learned import Learned, load_net, save_net
from danlab.metrics import crps, energy_score, rmse
from danlab.nets import build_net
from danlab.observations import Obs
from danlab.rng import BatchRNG, derive_seed, make_generator
from danlab.training.train_config import TrainRunConfig
from danlab.twin import TwinStream

TRAIN_FORMAT = "danlab-train/1"
# knobs that change how a run executes, not what it computes: they may differ when resuming
RUNTIME_KNOBS = {"train.device", "train.threads", "train.bf16", "train.compile", "train.checkpoint_every_s",
                 "train.log_every", "train.val_every", "train.val_every_s"}
# the learning-rate schedule of the steps still to come may change too (a warm restart, a longer or shorter
# decay); the state (parameters, Adam moments, trajectories, RNGs) carries over unchanged, and every such
# change is recorded in the run's schedule history, which goes into the provenance of exported weights;
# so may the weight averaging (ema), which never feeds back into the training itself, and the batch size Nt
# (a larger batch at the end of a run lowers the gradient noise, as a lower learning rate does): on a change of
# Nt the first min(old, new) trajectories carry over and fresh ones, spun up from the run's seed, fill the batch
# the teacher's weight in the target may change too (e.g. to 0 for the final decay); a teacher switched on at a
# resume starts from fresh ensembles around the current truths
# and the parameters that train (train_only: e.g. a gate fitted alone first, then the whole network; a parameter that
# starts to train at a resume starts with a fresh Adam state)
SCHEDULE_KNOBS = {"train.max_steps", "train.lr", "train.lr_min", "train.warmup", "train.lr_head", "train.ema", "train.Nt",
                  "train.teacher_weight", "train.distill_steps", "train.distill_lr", "train.train_only"}
HEAD = ("out.", "gain", "gate.")  # parameters whose learning rate is lr × lr_head
# val_armse is the validated (and saved) network's: the averaged one when ema > 0, whose raw weights score val_raw_armse
# and, for an ensemble (N > 1), its mean analysis spread val_spread
METRICS = ["step", "wall_s", "lr", "loss", "train_rmse", "resets", "skipped", "val_armse", "val_ci", "val_raw_armse",
           "val_spread"]


def _science(cfg) -> dict:
    """A config dict flattened to 'section.key' entries (keys renamed since upgraded), without the runtime and
    schedule knobs, which are named by their dotted path: `model.substeps` is physics, `train.max_steps` is not."""
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for sec, val in upgrade_renamed(cfg).items():
        for k, v in (val.items() if isinstance(val, dict) else [("", val)]):
            key = f"{sec}.{k}" if k else sec
            if key not in RUNTIME_KNOBS | SCHEDULE_KNOBS:
                out[key] = v
    return out


class _StopOnSignal:
    """While training, SIGINT and SIGTERM only ask the loop to stop after the current step (which then
    checkpoints), so an interrupted run loses nothing; a second signal interrupts at once. In the main thread only
    (signal handlers cannot be set elsewhere, e.g. in a Dask worker's thread)."""

    def __init__(self):
        self.signal: str | None = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._ask) for s in (signal.SIGINT, signal.SIGTERM)}

    def _ask(self, signum, frame):
        if self.signal:  # the second time: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _with_defaults(saved):
    """A run's saved config with the knobs added since it was written at their defaults (a new knob's default is
    the behaviour before it existed); as saved if it no longer validates (the comparison then names the keys)."""
    try:
        return TrainRunConfig.model_validate(upgrade_renamed(saved)).model_dump(mode="json")
    except (ValueError, TypeError):
        return saved


def two_phase(tc) -> bool:
    """Whether the distillation and the windows are two phases, each with its own warm-up and schedule, the
    optimiser's state cleared between them (distill_lr set)."""
    return tc.distill_lr is not None and tc.distill_steps > 0


def lr_at(step: int, tc) -> float:
    """Linear warm-up, then cosine decay from lr to lr_min over the remaining steps. In two phases (distill_lr
    set): the distillation steps warm up to distill_lr and stay there, then the windows warm up again to lr
    and the cosine spans them alone."""
    if two_phase(tc) and step < tc.distill_steps:
        return tc.distill_lr * min(step + 1, tc.warmup) / max(tc.warmup, 1)
    start = tc.distill_steps if two_phase(tc) else 0
    if step - start < tc.warmup:
        return tc.lr * (step - start + 1) / tc.warmup
    t = (step - start - tc.warmup) / max(tc.max_steps - start - tc.warmup, 1)
    return tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1 + math.cos(math.pi * min(t, 1.0)))


def plot_curve(metrics, path: Path, title: str) -> None:
    """Validation aRMSE against training wall-clock time (metrics: the run's metrics.csv as a DataFrame), written
    atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    v = metrics.dropna(subset=["val_armse"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(v["wall_s"] / 60, v["val_armse"], marker="o", ms=2, label="validated network")
    if "val_raw_armse" in v and v["val_raw_armse"].notna().any():
        ax.plot(v["wall_s"] / 60, v["val_raw_armse"], lw=0.8, alpha=0.6, label="raw weights")
        ax.legend(fontsize=8)
    ax.set_xlabel("training wall-clock time (min)")
    ax.set_ylabel("validation aRMSE")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def validation_twin(cfg: TrainRunConfig, model=None, start: dict | None = None) -> TwinStream:
    """The held-out validation trajectories at their first cycle (spun up, or resumed from `start`, the
    state_dict of one spun up earlier: the spin-up is most of a short validation's cost on QG, 100 days)."""
    tc = cfg.train
    model = cfg.model.build() if model is None else model
    return TwinStream(model, cfg.observations.build(cfg.model.Nx), tc.val_batch, tc.val_seed, ids=list(range(tc.val_batch)),
                      dtype=torch.float32, device=tc.device, start=start)


def validate(cfg: TrainRunConfig, net, cycles: int | None = None, with_spread: bool = False,
             start: dict | None = None) -> tuple:
    """aRMSE ± CI of the network as a filter on the held-out validation trajectories (and, with_spread, the
    mean analysis spread third); start: see validation_twin."""
    tc = cfg.train
    model = cfg.model.build()
    twin = validation_twin(cfg, model, start)
    ids = list(range(tc.val_batch))
    was_training = net.training
    net.eval()
    res = run_cycles(Learned.from_net(net, tc.N, tc.perturb_obs), model, twin, cycles or tc.val_cycles, tc.val_burn_in,
                     seed=tc.val_seed, ids=ids, init_std=tc.init_std)
    net.train(was_training)
    s = res.scores()
    return (s["armse"], s["armse_ci"]) + ((s["spread"],) if with_spread else ())


def _widen(stored: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored network's tensors set into a wider network's (more filters, net.Nf, or the precision input's extra
    input channel), for train.init_from. Each stored tensor fills the leading corner of the wider one (output
    channels first, then input channels); the entries of the new channels keep the wider network's fresh
    initialisation, except the weights by which a stored output channel would read a new input channel, which are
    zero. So the stored channels compute what they did, the new channels reach the increment only through the
    output layer's weights on them, which start at zero (as every output layer's do), and the wider network starts
    from the stored network's analyses (to float32 round-off: its products sum over more, zero, terms). Net2Net's
    function-preserving widening, new units random."""
    out = {}
    for k, w in stored.items():
        t = fresh[k].clone()
        t[tuple(slice(0, n) for n in w.shape)] = w
        if w.dim() >= 2:
            t[: w.shape[0], w.shape[1]:] = 0
        out[k] = t
    return out


class Trainer:
    """Holds the whole training state; `run()` is the loop."""

    def __init__(self, cfg: TrainRunConfig, run_dir: str | Path):
        self.cfg, self.dir = cfg, Path(run_dir)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if torch.device(tc.device).type == "cuda":  # fp32 means fp32 on a GPU too: no TF32 in convolutions or products
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.manual_seed(cfg.seed)  # nothing should draw from the global generator; this pins it anyway
        self.model = cfg.model.build()
        self.observer = cfg.observations.build(cfg.model.Nx)
        init = make_generator(cfg.seed, "net-init")
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=init)))
            self.net = build_net(cfg.net).to(tc.device)
        self.freeze()
        self.opt = torch.optim.Adam(self.param_groups(), lr=tc.lr)
        # Polyak averaging: an exponential moving average of the weights, the network that is validated and kept
        self.avg = copy.deepcopy(self.net).requires_grad_(False) if tc.ema else None
        self.twin = TwinStream(self.model, self.observer, tc.Nt, cfg.seed, ids=None, dtype=torch.float32, device=tc.device)
        self.reset_rng = BatchRNG(cfg.seed, "reset", tc.Nt)
        self.E = initial_ensemble(self.twin.x, tc.N, BatchRNG(cfg.seed, "init", tc.Nt), tc.init_std)
        self.threshold = divergence_threshold(self.twin.x, tc.reset_factor)
        self.teacher = EnKF_N(N=tc.teacher_N, xN=tc.teacher_xN) if tc.teacher_weight > 0 or tc.distill_steps > 0 else None
        self.teacher_rng = BatchRNG(cfg.seed, "teacher", tc.Nt)
        self.E_teacher = initial_ensemble(self.twin.x, tc.teacher_N, self.teacher_rng, tc.init_std) if self.teacher else None
        self.pairs: dict | None = None  # the stored distillation set (distill_cycles > 0), made when first needed
        self.perm: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation of the stored set)
        self.step, self.wall_s, self.best = 0, 0.0, float("inf")
        self.history: list[dict] = []  # schedule changes made on resume: [{"step": s, "set": {knob: value}}]
        # the code this process runs, read once at its start (a commit made while it trains is not its code), and
        # the code of each earlier session of a resumed run: [{"step": first step, "code": version}]
        self.code_versions: list[dict] = [{"step": 0, "code": code_version()}]
        # the analysis is the learned filter's own, compiled or not
        self.filter = Learned.from_net(torch.compile(self.net) if tc.compile else self.net, tc.N, tc.perturb_obs)
        self.perturb_rng = BatchRNG(cfg.seed, "perturb", tc.Nt)  # the windows' observation perturbations (perturb_obs)

    def warm_start(self, path: str) -> None:
        """Start from the weights of the network stored in `path` (train.init_from; a new run only: a resumed one
        carries its own), which must have this run's network config, or the same with fewer residual blocks
        (net.Nbl): the network then grows, its blocks followed by new ones whose last convolution is zero, so
        that each new block starts as the identity and the grown network computes what the stored one did (a
        curriculum from a small network to a large one). It may also be wider (more filters, net.Nf) and gain the
        precision input (net.precision_input true where the stored one has none): see `_widen`; the first
        convolution's weights on that input channel start at zero, so that, again, the network starts from what the
        stored one computed. It may gain a gated gain (net.gate where the stored one has none), whose convolution
        starts at zero, so again the network starts from the stored one's analyses. The average starts from them
        too. net.reflect may differ either way (the same weights, averaged over the reflection or not: a network
        trained without it starts from its own reflection average)."""
        net, _ = load_net(path)
        theirs, ours = net.cfg.model_dump(mode="json"), self.cfg.net.model_dump(mode="json")
        gains_prec = not theirs.get("precision_input") and ours.get("precision_input")
        grow = theirs["Nbl"] < ours["Nbl"]
        wider = theirs["Nf"] < ours["Nf"]
        gains_gate = not theirs.get("gate") and ours["gate"]
        allowed = {**theirs, "Nbl": ours["Nbl"] if grow else theirs["Nbl"], "Nf": ours["Nf"] if wider else theirs["Nf"],
                   "precision_input": ours["precision_input"] if gains_prec else theirs.get("precision_input"),
                   "reflect": ours["reflect"], "gate": ours["gate"] if gains_gate else theirs.get("gate", 0)}
        if allowed != ours:
            diff = [k for k in sorted(set(theirs) | set(ours)) if allowed.get(k) != ours.get(k)]
            k = diff[0]
            raise ConfigError(f"train.init_from: {path} holds a network with net.{k} = {theirs.get(k)!r}, this run's "
                              f"net.{k} is {ours.get(k)!r}" + (" (a network can only grow: more blocks, net.Nbl, "
                                                              "more filters, net.Nf, the precision input, "
                                                              "net.precision_input, or a gated gain, net.gate, "
                                                              "nothing else changed)"
                                                              if k in ("Nbl", "Nf", "precision_input", "gate")
                                                              or grow or wider or gains_prec or gains_gate else ""))
        state = net.state_dict()
        if wider or gains_prec:
            state = _widen(state, self.net.state_dict())
        new = range(theirs["Nbl"], ours["Nbl"])  # the blocks a grown network adds (none otherwise)
        for target in [self.net] + ([self.avg] if self.avg is not None else []):
            # a grown network: its new blocks only missing; a gated one: its gate (zero, as built)
            target.load_state_dict(state, strict=not (grow or gains_gate))
            with torch.no_grad():
                for b in new:
                    last = target.blocks[b].f[-1]
                    last.weight.zero_()
                    last.bias.zero_()

    def freeze(self) -> None:
        """train.train_only: every parameter not named by one of its prefixes (each names one: TrainRunConfig checks)
        stops requiring a gradient; the windows still backpropagate through it to those that train, and through the
        model."""
        only = self.cfg.train.train_only
        if only is None:
            return
        for n, p in self.net.named_parameters():
            p.requires_grad_(any(n.startswith(prefix) for prefix in only))

    def param_groups(self) -> list[dict]:
        """Adam's groups: the body at lr, the head (output layer, gated gain and gain) at lr × lr_head; a parameter
        frozen by train.train_only is in neither."""
        named = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        groups = [([(n, p) for n, p in named if not n.startswith(HEAD)], 1.0),
                  ([(n, p) for n, p in named if n.startswith(HEAD)], self.cfg.train.lr_head)]
        # the names travel with the checkpoint: they say which parameter each saved Adam state belongs to
        return [{"params": [p for _, p in g], "names": [n for n, _ in g], "lr_scale": s} for g, s in groups]

    # ---- checkpoints -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.avg is not None:
            t |= {f"ema.{k}": v for k, v in self.avg.state_dict().items()}
        osd = self.opt.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                t[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        t["state.E"], t["state.x"] = self.E, self.twin.x
        if self.teacher_in_use():  # a teacher idle since the distillation is not kept: it would be stale
            t["state.E_teacher"] = self.E_teacher
        for name, rng in self._rngs():
            for j, s in enumerate(rng.get_state()):
                t[f"rng.{name}.{j}"] = s
        return t

    def save(self) -> None:
        meta = {"format": TRAIN_FORMAT, "config": self.cfg.model_dump(mode="json"), "step": self.step,
                "wall_s": self.wall_s, "best_val_armse": self.best, "threshold": self.threshold,
                "twin_k": self.twin.k, "param_groups": self.opt.state_dict()["param_groups"],
                "schedule_history": self.history,
                "code_version": self.code_versions[-1]["code"], "code_versions": self.code_versions}
        write_checkpoint(self.dir, "checkpoint", self.state_tensors(), meta)

    def load(self) -> None:
        t, meta = read_checkpoint(self.dir, "checkpoint", TRAIN_FORMAT)
        saved, now = _science(_with_defaults(meta.get("config"))), _science(self.cfg.model_dump(mode="json"))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "absent") != now.get(k, "absent"))
            raise CheckpointError(f"{self.dir}/checkpoint.json: saved with a different config ({', '.join(diff)} differ)")
        try:
            load_state_strict(self.net, {k[4:]: v for k, v in t.items() if k.startswith("net.")}, str(self.dir))
            if self.avg is not None:  # averaging switched on at this resume starts from the current weights
                avg = {k[4:]: v for k, v in t.items() if k.startswith("ema.")}
                load_state_strict(self.avg, avg or self.net.state_dict(), str(self.dir))
            state: dict = {}
            for k, v in t.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            # load into the groups the run was saved with, then carry each parameter's Adam state over
            by_name = dict(self.net.named_parameters())
            names = [n for g in meta["param_groups"] for n in g.get("names", [])] or list(by_name)  # older runs: one group
            order = [by_name[n] for n in names]
            saved = torch.optim.Adam([{"params": [order[i] for i in g["params"]]} for g in meta["param_groups"]])
            saved.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
            for p in order:
                if p in saved.state:
                    self.opt.state[p] = saved.state[p]
            fresh_E, fresh_x = self.E, self.twin.x
            self.E, x = t["state.E"].to(self.cfg.train.device), t["state.x"].to(self.cfg.train.device)
            if len(x) != len(fresh_x):  # a new batch size: keep the first trajectories, fill up with fresh ones
                keep = min(len(x), len(fresh_x))
                self.E, x = torch.cat([self.E[:keep], fresh_E[keep:]]), torch.cat([x[:keep], fresh_x[keep:]])
            fresh_teacher = self.teacher is not None and "state.E_teacher" not in t
            if self.teacher is not None and not fresh_teacher:
                ET = t["state.E_teacher"].to(self.cfg.train.device)
                keep = min(len(ET), len(self.E_teacher))
                self.E_teacher = torch.cat([ET[:keep], self.E_teacher[keep:]])
            rngs = {n: [t[f"rng.{n}.{j}"] for j in range(len(r.gens))] for n, r in self._rngs()
                    if n != "teacher" or f"rng.{n}.0" in t}
        except (KeyError, ValueError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{self.dir}: checkpoint does not match this training setup ({exc})") from None
        self.twin.load_state_dict({"x": x, "k": meta["twin_k"], "truth_rng": rngs["truth"], "obs_rng": rngs["obs"]})
        for name, rng in self._rngs()[2:]:  # the truth's and the observations' went with the twin's state
            if name in rngs:  # a teacher's only when saved (one switched on at this resume starts afresh)
                rng.set_state(rngs[name])
        if fresh_teacher:  # a teacher switched on at this resume (or again after idle windows) starts afresh
            self.E_teacher = initial_ensemble(self.twin.x, self.teacher.N, self.teacher_rng, self.cfg.train.init_std)
        self.step, self.wall_s = int(meta["step"]), float(meta["wall_s"])
        self.best, self.threshold = float(meta["best_val_armse"]), float(meta["threshold"])
        self.history = list(meta.get("schedule_history", []))
        here = self.code_versions[-1]["code"]
        self.code_versions = list(meta.get("code_versions") or [{"step": 0, "code": meta.get("code_version", "unknown")}])
        if self.code_versions[-1]["code"] != here:
            self.code_versions.append({"step": self.step, "code": here})
        old = upgrade_renamed(meta["config"])["train"]
        knobs = sorted(k.removeprefix("train.") for k in SCHEDULE_KNOBS)
        default = {k: type(self.cfg.train).model_fields[k].default for k in knobs}  # knobs newer than the run
        changed = {k: getattr(self.cfg.train, k) for k in knobs if old.get(k, default[k]) != getattr(self.cfg.train, k)}
        if changed:
            self.history.append({"step": self.step, "set": changed})

    def teacher_in_use(self) -> bool:
        """Whether the teacher is cycled on the training trajectories at this step: during an online distillation, or
        for windows with a teacher weight."""
        tc = self.cfg.train
        return self.teacher is not None and (tc.teacher_weight > 0 or (self.step < tc.distill_steps and not tc.distill_cycles))

    def _rngs(self) -> tuple:
        return (("truth", self.twin.truth_rng), ("obs", self.twin.obs_rng), ("reset", self.reset_rng),
                ("teacher", self.teacher_rng)) + ((("perturb", self.perturb_rng),) if self.cfg.train.perturb_obs else ())

    # ---- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_target(self, x: torch.Tensor, obs, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One cycle of the teacher on this cycle's observations: the target w x̄^a_teacher + (1 - w) x and the
        teacher's forecast ensemble.

        A teacher trajectory that failed gives the truth as target this cycle (see teacher_cycle)."""
        EfT, self.E_teacher, xa, _ = self.teacher_cycle(self.E_teacher, x, obs, self.teacher_rng)
        return x + w * (xa - x), EfT

    @torch.no_grad()
    def teacher_cycle(self, ET: torch.Tensor, x: torch.Tensor, obs, rng: BatchRNG):
        """One cycle of the teacher's ensembles ET on this cycle's observations: (forecast, analysis, analysis mean,
        lost). A lost trajectory (non-finite, or beyond the reset threshold) restarts around its truth x (drawn from
        rng), which then also stands for its forecast and its analysis mean."""
        EfT, ET = self.teacher.cycle(ET, self.model, obs, None)
        xa = ET.mean(1)
        bad = lost(rmse(xa, x), self.threshold)
        if bad.any():
            fresh = initial_ensemble(x, self.teacher.N, rng, self.cfg.train.init_std)
            ET = torch.where(bad.view(-1, 1, 1), fresh, ET)
            EfT = torch.where(bad.view(-1, 1, 1), fresh, EfT)
            xa = torch.where(bad.view(-1, 1), x, xa)
        return EfT, ET, xa, bad

    def distill_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One cycle of a_θ on the teacher's forecast and on its own (the forecast of its carried analysis, not
        differentiated through the model), both against the same target: (loss, a_θ's own E^a, truth).

        The teacher's forecasts alone teach a map that is not stable when cycled: measured, a network that put
        its single-cycle analyses of them within 0.057 of the teacher's scored 0.54 as a filter. Its own
        forecasts keep the samples on the errors it makes itself (as in DAgger); the target stays valid there,
        since the teacher's analysis mean estimates E[x_k | y_1:k] and a_θ's forecast is a function of y_1:k-1."""
        tc = self.cfg.train
        x, obs = self.twin.step()
        target, EfT = self.teacher_target(x, obs, 1.0)
        Ef = EfT.mean(1, keepdim=True) if tc.N == 1 else EfT[:, :tc.N]
        with torch.no_grad():
            Ef_own = self.model(self.E)
        with self._amp():
            both = obs.select(torch.arange(len(x), device=x.device).repeat(2))
            Ea, E = self.filter.analysis(torch.cat([Ef, Ef_own]), both, None).chunk(2)
        return 0.5 * ((Ea - target.unsqueeze(1)).pow(2).mean() + (E - target.unsqueeze(1)).pow(2).mean()), E, x

    @torch.no_grad()
    def distill_set(self) -> dict:
        """The stored distillation set (distill_cycles > 0): the teacher cycled on 2 Nt trajectories of its own
        seeded stream (not the training trajectories, not the validation's); after distill_burn_in cycles, each cycle
        stores per trajectory its forecast mean (first N members when N > 1), the observations, its analysis mean
        (the target) and the truth (for monitoring). A function of the seed and the config alone, so a resumed run
        makes the same set again instead of checkpointing it. A teacher trajectory that fails restarts around its truth,
        and that cycle is not stored."""
        tc, B = self.cfg.train, 2 * self.cfg.train.Nt
        seed = derive_seed(self.cfg.seed, "distill-set")
        twin = TwinStream(self.model, self.observer, B, seed, ids=None, dtype=torch.float32, device=tc.device)
        rng = BatchRNG(seed, "teacher", B)
        ET = initial_ensemble(twin.x, tc.teacher_N, rng, tc.init_std)
        keep: dict[str, list] = {"Ef": [], "y": [], "mask": [], "xa": [], "x": []}
        for k in range(tc.distill_cycles):
            x, obs = twin.step()
            EfT, ET, xa, bad = self.teacher_cycle(ET, x, obs, rng)
            if k >= tc.distill_burn_in:
                ok = ~bad
                Ef = EfT.mean(1, keepdim=True) if tc.N == 1 else EfT[:, :tc.N]
                for name, v in (("Ef", Ef), ("y", obs.y), ("mask", obs.mask), ("xa", xa), ("x", x)):
                    keep[name].append(v[ok])
        pairs = {k: torch.cat(v) for k, v in keep.items()}
        if len(pairs["x"]) < 2 * tc.Nt:
            raise ConfigError(f"train.distill_cycles: the teacher kept {len(pairs['x'])} pairs, fewer than one minibatch "
                             f"of {2 * tc.Nt}: raise distill_cycles above distill_burn_in, or the teacher's trajectories fail")
        pairs["sigma"] = obs.sigma
        return pairs

    def stored_distill_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A minibatch of 2 Nt stored pairs (see distill_set): a_θ's analysis of the teacher's forecast against the
        teacher's analysis mean: (loss, a_θ's E^a, truth). Minibatch i of epoch e is slice i of a permutation drawn
        from the seed and e, so the order depends on the step alone (a resumed run draws the same batches)."""
        tc = self.cfg.train
        if self.pairs is None:
            self.pairs = self.distill_set()
        P, bs = len(self.pairs["x"]), 2 * tc.Nt
        per_epoch = max(P // bs, 1)
        epoch, i = divmod(self.step, per_epoch)
        if self.perm[0] != epoch:
            self.perm = (epoch, torch.randperm(P, generator=make_generator(self.cfg.seed, f"distill-epoch/{epoch}")))
        idx = self.perm[1][i * bs:(i + 1) * bs].to(tc.device)
        p = self.pairs
        obs = Obs(p["y"][idx], p["mask"][idx], p["sigma"])
        with self._amp():
            Ea = self.filter.analysis(p["Ef"][idx], obs, None)
        return (Ea - p["xa"][idx].unsqueeze(1)).pow(2).mean(), Ea, p["x"][idx]

    def _amp(self):
        tc = self.cfg.train
        return torch.autocast(device_type=torch.device(tc.device).type, dtype=torch.bfloat16) if tc.bf16 else nullcontext()

    def window_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N_iter chained cycles from the current states, differentiable throughout: (loss, last E^a, last truth)."""
        tc = self.cfg.train
        if tc.loss == "semisupervised":
            return self.semisupervised_window_loss()
        E, loss = self.E, 0.0
        for _ in range(tc.N_iter):
            x, obs = self.twin.step()
            with self._amp():  # the learned filter's own cycle, as in every run; autocast leaves the model's ops alone
                _, E = self.filter.cycle(E, self.model, obs, self.perturb_rng)  # draws only if perturb_obs > 0
            target = self.teacher_target(x, obs, tc.teacher_weight)[0] if self.teacher_in_use() else x
            loss = loss + self.cycle_loss(E, target)
        self.last_obs = obs
        loss = loss / tc.N_iter  # per trajectory
        if tc.loss_norm == "trajectory":  # each trajectory weighs the same in the gradient; the value stays the mean
            w = loss.detach().clamp_min(torch.finfo(loss.dtype).tiny)
            return (loss / w).mean() * w.mean(), E, x
        return loss.mean(), E, x

    def cycle_loss(self, E: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One cycle's term of the supervised losses, per trajectory (B,): the members' mean squared error (loss
        supervised), or a proper score of the ensemble (energy, crps)."""
        loss = self.cfg.train.loss
        if loss == "energy":
            return energy_score(E, target)
        if loss == "crps":
            return crps(E, target)
        return (E - target.unsqueeze(1)).pow(2).flatten(1).mean(1)

    def semisupervised_window_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Observations only (eq. 15 of the reference work): the analysis of cycle k is judged by how well its
        forecast fits the next observations, L_k = |y_k+1 - H_k+1 M(x^a_k)|² / Ny, for each of the N_iter analyses
        of the window, differentiable through the analysis of the same cycle (and the earlier ones) and the model.
        The window takes N_iter + 1 cycles: the last cycle's observations score the last analysis' forecast, and
        are then assimilated (not differentiated) into the state carried to the next window. The truth is only
        returned, for monitoring; it reaches neither the loss nor the resets (see train_step)."""
        tc = self.cfg.train
        x, obs = self.twin.step()
        Ef, loss = self.model(self.E), 0.0
        for _ in range(tc.N_iter):
            with self._amp():
                E = self.filter.analysis(Ef, obs, self.perturb_rng)
            x, obs = self.twin.step()
            Ef = self.model(E)
            loss = loss + obs.innovation(Ef).pow(2).sum(-1).div(obs.Ny.unsqueeze(-1)).mean()
        with torch.no_grad(), self._amp():
            E = self.filter.analysis(Ef.detach(), obs, self.perturb_rng)
        self.last_obs = obs
        return loss / tc.N_iter, E, x

    def train_step(self) -> tuple[float, float, int, bool]:
        tc = self.cfg.train
        if two_phase(tc) and self.step == tc.distill_steps:
            # the windows' loss is ~40x the distillation's (0.08 against 0.002 at the switch, measured): Adam's second
            # moments from the distillation would make their first steps far too large (measured, recipe stored-distill:
            # the raw weights' validation went 0.25 → 0.39 within 170 windows, 0.31 with this reset and warm-up)
            self.opt.state.clear()
        lr = lr_at(self.step, tc)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        stored = self.step < tc.distill_steps and tc.distill_cycles > 0
        if stored:
            loss, E, x = self.stored_distill_loss()
        else:
            loss, E, x = self.distill_loss() if self.step < tc.distill_steps else self.window_loss()
        self.opt.zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(loss))
        if ok:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tc.clip)
            self.opt.step()
            if self.avg is not None:
                self.average()
        with torch.no_grad():
            E = E.detach()
            r = rmse(E.mean(1), x)
            if stored:  # the minibatch's analyses against its truths; the training trajectories wait for the windows
                self.step += 1
                return float(loss.detach()), float(r.mean()), 0, ok
            if tc.loss == "supervised":  # lost trajectories restart around their truth
                far, base = r, x
            else:  # without the truth: judged by their misfit to the observations, restarted around them
                obs = self.last_obs
                far = obs.innovation(E.mean(1)).pow(2).sum(-1).div(obs.Ny).sqrt()
                base = obs.y + (1 - obs.mask) * (obs.y.sum(-1, keepdim=True) / obs.Ny.unsqueeze(-1))
            bad = lost(far, self.threshold)  # the same test as a scored run's divergence flag (cycle.py)
            n_bad = int(bad.sum())
            if n_bad:
                fresh = initial_ensemble(base, tc.N, self.reset_rng, tc.init_std)
                E = torch.where(bad.view(-1, 1, 1), fresh, E)
            self.E = E
        self.step += 1
        return float(loss.detach()), float(r[~bad].mean()) if n_bad < len(r) else float("nan"), n_bad, ok

    @torch.no_grad()
    def average(self) -> None:
        """avg ← d·avg + (1 − d)·θ, for every floating-point tensor of the network, with the decay
        d = min(ema, (1 + step)/(10 + step)): early in a run the average follows the fast-moving weights over a
        window that grows with the step (a fixed 0.999 would still hold 78 % of the initial weights at step 250),
        later it is the configured ema."""
        d = min(self.cfg.train.ema, (1 + self.step) / (10 + self.step))
        for a, p in zip(self.avg.state_dict().values(), self.net.state_dict().values()):
            if a.is_floating_point():
                a.lerp_(p, 1 - d)
            else:
                a.copy_(p)

    @property
    def kept(self) -> torch.nn.Module:
        """The network that is validated, saved as best and exported: the average when there is one."""
        return self.net if self.avg is None else self.avg

    def log(self, row: dict) -> None:
        path = self.dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRICS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in METRICS})

    def _trim_metrics(self) -> None:
        """On resume, drop the rows written after the checkpoint (they will be written again)."""
        path = self.dir / "metrics.csv"
        if path.exists():
            rows = list(csv.DictReader(path.open()))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=METRICS)
            w.writeheader()
            w.writerows(r for r in rows if int(r["step"]) <= self.step)
            atomic_write_text(path, buf.getvalue())

    def run(self, stop_after: int | None = None, progress: bool = True, max_wall_s: float | None = None) -> dict:
        """Train until cfg.train.max_steps (or `stop_after` more steps, or until the run's training wall-clock reaches
        `max_wall_s`, validating there); checkpoints on the way and at the end."""
        tc = self.cfg.train
        self._trim_metrics()
        end = tc.max_steps if stop_after is None else min(tc.max_steps, self.step + stop_after)
        t_start, last_ckpt = time.perf_counter(), time.perf_counter()
        last_val = t_start
        wall0 = self.wall_s
        loss_ema = rmse_ema = val_start = None
        resets = skipped = 0
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not progress, desc="train", mininterval=2.0)
        with _StopOnSignal() as stop:  # Ctrl-C or a SIGTERM (a scheduler's preemption): checkpoint after this step, then stop
            while self.step < end and not stop.signal:
                loss, r, n_bad, ok = self.train_step()
                resets += n_bad
                skipped += 0 if ok else 1
                if ok:
                    loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
                if math.isfinite(r):
                    rmse_ema = r if rmse_ema is None else 0.95 * rmse_ema + 0.05 * r
                self.wall_s = wall0 + time.perf_counter() - t_start
                row = None
                if self.step % tc.log_every == 0:
                    row = {"step": self.step, "wall_s": f"{self.wall_s:.1f}", "lr": f"{lr_at(self.step - 1, tc):.3g}",
                           "loss": f"{loss:.5g}", "train_rmse": f"{r:.4f}", "resets": resets, "skipped": skipped}
                    resets = skipped = 0
                out_of_time = max_wall_s is not None and self.wall_s >= max_wall_s
                if (self.step % tc.val_every == 0 or self.step == tc.max_steps or out_of_time
                        or (tc.val_every_s is not None and time.perf_counter() - last_val >= tc.val_every_s)):
                    last_val = time.perf_counter()
                    if val_start is None:  # the held-out truth spun up once per session, not at every validation
                        val_start = validation_twin(self.cfg).state_dict()
                    v = validate(self.cfg, self.kept, with_spread=tc.N > 1, start=val_start)
                    va, ci = v[:2]
                    row = (row or {"step": self.step, "wall_s": f"{self.wall_s:.1f}"}) | {"val_armse": f"{va:.4f}", "val_ci": f"{ci:.4f}"}
                    if tc.N > 1:
                        row["val_spread"] = f"{v[2]:.4f}"
                    if self.avg is not None:
                        row["val_raw_armse"] = f"{validate(self.cfg, self.net, start=val_start)[0]:.4f}"
                    # the kept network is the best validated one; trained from observations only, the latest (its
                    # validation against the truth is monitoring only, never a choice that the truth makes)
                    if va < self.best or tc.loss == "semisupervised":
                        self.best = va
                        save_net(self.dir / "best", self.kept, self.provenance(va, ci))
                    bar.set_postfix_str(f"val {va:.3f}", refresh=False)
                if row:
                    self.log(row)
                    if "val_armse" in row:  # the curve so far, beside the metrics
                        import pandas as pd
                        plot_curve(pd.read_csv(self.dir / "metrics.csv"), self.dir / "curve.png",
                                   f"{self.dir.name}: validation aRMSE during training")
                bar.update(1)
                if loss_ema is not None and rmse_ema is not None:
                    bar.set_postfix_str(f"loss {loss_ema:.4f} rmse {rmse_ema:.3f} best {self.best:.3f}", refresh=False)
                if time.perf_counter() - last_ckpt > tc.checkpoint_every_s:
                    self.save()
                    last_ckpt = time.perf_counter()
                if out_of_time:
                    break
        bar.close()
        self.save()
        return {"step": self.step, "wall_s": self.wall_s, "best_val_armse": self.best} | (
            {"stopped_by": stop.signal} if stop.signal else {})

    def provenance(self, val_armse: float, val_ci: float) -> dict:
        return {"trained_with": self.cfg.model_dump(mode="json"), "step": self.step, "wall_s": round(self.wall_s, 1),
                "val_armse": val_armse, "val_ci": val_ci, "code_version": self.code_versions[-1]["code"],
                "code_versions": self.code_versions,
                "schedule_history": self.history,
                "val_setup": {"seed": self.cfg.train.val_seed, "trajectories": self.cfg.train.val_batch,
                              "cycles": self.cfg.train.val_cycles, "burn_in": self.cfg.train.val_burn_in},
                "threads": torch.get_num_threads(), "device": self.cfg.train.device}


def train(cfg: TrainRunConfig, run_dir: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, max_wall_s: float | None = None) -> dict:
    """Start (or resume) a training run in `run_dir`."""
    run_dir = Path(run_dir)
    trainer = Trainer(cfg, run_dir)
    if resume:
        trainer.load()  # refuses a config that differs in more than runtime and schedule knobs
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # the knobs in force from now on
    else:
        if (run_dir / "checkpoint.json").exists():
            raise CheckpointError(f"{run_dir}: already holds a training run; use --resume or another --out")
        if cfg.train.init_from is not None:
            trainer.warm_start(cfg.train.init_from)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return trainer.run(stop_after=stop_after, progress=progress, max_wall_s=max_wall_s)
