"""Every knob of a training run in one config object."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from danlab.config import MODEL_FIELD, ModelConfig, ObsConfig, Strict
from danlab.nets import NetConfig, build_net


class TrainConfig(Strict):
    renamed: ClassVar[dict[str, str]] = {"steps": "max_steps", "Ne": "N"}
    Nt: int = Field(256, ge=1, description="concurrent training trajectories (batch)")
    N: int = Field(1, ge=1, description="ensemble size (Ne in the paper; 1: a single state)")
    N_iter: int = Field(10, ge=1, description="chained DA cycles backpropagated through per step")
    max_steps: int = Field(20_000, ge=1, description="optimiser steps of the run")
    lr: float = Field(1e-3, gt=0)
    lr_min: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup: int = Field(200, ge=0, description="linear warm-up steps")
    lr_head: float = Field(1.0, gt=0, description="learning-rate factor of the output layer and the gain "
                                                   "(a sharp direction: a uniform increment is barely damped by the cycles)")
    ema: float = Field(0.0, ge=0, lt=1, description="weight averaging: the validated and kept network is the exponential "
                                                     "moving average of the weights with this decay per step, or (1 + step)/(10 + step) "
                                                     "if smaller (early in a run); 0: off")
    clip: float = Field(1.0, gt=0, description="gradient norm clipping")
    loss: Literal["supervised", "semisupervised", "energy", "crps"] = Field(
        "supervised", description="supervised: each member's squared error against the truth (the reference work's; with "
        "N > 1 it rewards a collapsed ensemble); semisupervised: the next observations' misfit of the forecast, no truth "
        "(eq. 15); energy / crps: a proper score of the ensemble against the truth (the fair energy score, or the fair "
        "CRPS per site), which rewards a spread that matches the error; N >= 2")
    loss_norm: Literal["none", "trajectory"] = Field(
        "none", description="trajectory (loss supervised): each trajectory's window error is weighted by the inverse of "
        "its own (not differentiated), rescaled by their mean, so that every trajectory weighs the same in the gradient "
        "whatever its error level (e.g. sparse and dense observation networks in one batch, observations.count_by: "
        "experiment, where the sparse ones' large errors would otherwise set the gradient); the loss value stays the mean "
        "squared error")
    perturb_obs: float = Field(0.0, ge=0, description="N > 1: each member's own innovation is taken against "
                               "observations perturbed by perturb_obs × N(0, R), centred over the members (the stochastic "
                               "EnKF's source of spread; a deterministic a_θ otherwise has none, and its ensemble collapses "
                               "whatever the loss); the network keeps this value for its evaluation")
    init_from: str | None = Field(None, description="a network folder (or training run folder) whose weights start the "
                                  "run instead of a random initialisation (a warm start, e.g. an Ne = 10 network from "
                                  "an Ne = 1 one); its network config must equal `net`, or have fewer blocks (net.Nbl: the network "
                                  "grows, the new blocks starting as the identity) or fewer filters (net.Nf: the new "
                                  "channels reach the output through weights that start at zero)")
    train_only: list[str] | None = Field(None, min_length=1, description="names (or name prefixes) of the network's parameters that "
                                         "train, e.g. [gate.] to fit a gated gain added to a trained network by init_from "
                                         "while the rest stays as stored (no drift of a converged body at the new part's "
                                         "learning rate); the others are frozen. None: every parameter trains")
    teacher_weight: float = Field(0.0, ge=0, le=1, description="supervised target = w × the analysis mean of a "
                                  "classical teacher (EnKF-N) cycled on the same observations + (1 - w) × the truth "
                                  "(0: the truth alone); measured: 3.7x less gradient noise than the truth's")
    teacher_N: int = Field(40, ge=2, description="ensemble size of the teacher EnKF-N")
    distill_steps: int = Field(0, ge=0, description="first optimiser steps that are single cycles (a_θ on the teacher's "
                               "forecast mean and on its own forecast, against the teacher's analysis mean, the model not differentiated) "
                               "instead of N_iter-cycle windows: a cheap warm start")
    distill_cycles: int = Field(0, ge=0, description="0: the distillation is online (a teacher cycle per step, on the "
                                "training trajectories). > 0: it reuses a stored set instead: the teacher is cycled this "
                                "many cycles on 2 Nt trajectories of its own, and its (forecast mean, observations) → analysis "
                                "mean pairs after distill_burn_in cycles are drawn in shuffled minibatches of 2 Nt, epoch "
                                "after epoch; no teacher cost per step, the training trajectories wait for the windows")
    distill_burn_in: int = Field(100, ge=0, description="teacher cycles not stored (its spin-up) when distill_cycles > 0")
    distill_lr: float | None = Field(None, gt=0, description="None: one warm-up and cosine over all steps. A value: two "
                                     "phases; the distillation steps warm up to this constant rate, then the windows start "
                                     "with a fresh optimiser state, warm up again to lr, and the cosine to lr_min spans them")
    teacher_xN: float = Field(2.0, gt=0, description="hyperprior confidence xN of the teacher EnKF-N")
    init_std: float = Field(1.0, ge=0, description="initial ensemble: truth + N(0, init_std^2)")
    reset_factor: float = Field(3.0, gt=0, description="reset a trajectory whose analysis RMSE exceeds this times the truth's spread")
    log_every: int = Field(10, ge=1)
    val_every: int = Field(200, ge=1, description="steps between validations")
    val_every_s: float | None = Field(None, gt=0, description="also validate when this many wall-clock seconds "
                                      "have passed since the last validation")
    val_cycles: int = Field(1000, ge=2)
    val_burn_in: int = Field(200, ge=0)
    val_batch: int = Field(8, ge=1, description="held-out validation trajectories")
    val_seed: int = Field(1_000_003, description="seed of the held-out validation trajectories")
    checkpoint_every_s: float = Field(300.0, gt=0, description="wall-clock seconds between checkpoints")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    bf16: bool = Field(False, description="bfloat16 autocast for the network (CPU AMX / GPU)")
    compile: bool = Field(False, description="torch.compile the network")

    @model_validator(mode="after")
    def _check(self):
        if self.val_burn_in >= self.val_cycles:
            raise ValueError(f"val_burn_in must be < val_cycles (got {self.val_burn_in} >= {self.val_cycles})")
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min must be <= lr (got {self.lr_min} > {self.lr})")
        if (self.teacher_weight > 0 or self.distill_steps > 0) and self.loss != "supervised":
            raise ValueError(f"teacher_weight > 0 and distill_steps > 0 need loss: supervised (got loss: {self.loss})")
        if self.loss_norm != "none" and self.loss != "supervised":
            raise ValueError(f"loss_norm: {self.loss_norm} weighs the supervised loss: set loss: supervised (got {self.loss})")
        if self.loss in ("energy", "crps") and self.N < 2:
            raise ValueError(f"loss: {self.loss} scores an ensemble: set N >= 2 (got N {self.N})")
        if self.perturb_obs > 0 and (self.N < 2 or self.distill_steps > 0):
            raise ValueError(f"perturb_obs > 0 perturbs an ensemble's windows: set N >= 2 and distill_steps 0 "
                             f"(got N {self.N}, distill_steps {self.distill_steps})")
        if self.distill_cycles > 0 and self.distill_steps == 0:
            raise ValueError("distill_cycles > 0 stores pairs for distillation steps: set distill_steps > 0 too")
        if self.distill_cycles > 0 and self.distill_burn_in >= self.distill_cycles:
            raise ValueError(f"distill_burn_in must be < distill_cycles (got {self.distill_burn_in} >= {self.distill_cycles})")
        if self.distill_steps > 0 and self.N > self.teacher_N:
            raise ValueError(f"distill_steps > 0 needs N <= teacher_N (got N {self.N} > teacher_N {self.teacher_N})")
        return self


class TrainRunConfig(Strict):
    seed: int = 0
    model: ModelConfig = MODEL_FIELD
    observations: ObsConfig = ObsConfig()
    net: NetConfig = NetConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self):
        self.observations.build(self.model.Nx)
        self.net.check_size(self.model.Nx)  # the network's kernel must fit in the state
        if self.net.reflect:  # and the model must have the symmetry it averages over
            self.net.check_model(self.model.build())
        if self.train.train_only:  # each prefix must name a parameter of this network
            names = [n for n, _ in build_net(self.net).named_parameters()]
            for prefix in self.train.train_only:
                if not any(n.startswith(prefix) for n in names):
                    raise ValueError(f"train.train_only: {prefix!r} names no parameter of this network (its "
                                     f"parameters: {', '.join(sorted({n.rsplit('.', 1)[0] for n in names}))})")
        return self
