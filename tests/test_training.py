import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from danlab.checkpoint import CheckpointError, read_checkpoint
from danlab.experiments.export import export
from danlab.learned import Learned, load_net, save_net
from danlab.nets import NetConfig, build_net
from danlab.training.train_config import TrainRunConfig
from danlab.training.trainer import TRAIN_FORMAT, Trainer, lr_at, train, validate, validation_twin

TINY = {"net": {"Nf": 8, "Nbl": 1, "Nl": 2}, "train": {"Nt": 16, "N_iter": 3, "max_steps": 8, "warmup": 2, "lr": 3e-3,
        "val_every": 4, "val_cycles": 40, "val_burn_in": 10, "val_batch": 2, "log_every": 1}}


def tiny(**train_kw) -> TrainRunConfig:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train_kw)
    return TrainRunConfig.model_validate(d)


def test_loss_falls_on_a_tiny_problem(tmp_path):
    cfg = tiny(max_steps=40, val_every=1000, Nt=32)
    tr = Trainer(cfg, tmp_path)
    losses = [tr.train_step()[0] for _ in range(40)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def whole_and_resumed(cfg: TrainRunConfig, tmp_path, stop_after: int) -> tuple[Trainer, Trainer]:
    """The run trained in one go (in tmp_path/whole) and interrupted after `stop_after` steps then resumed
    (in tmp_path/resumed), both loaded from their final checkpoints."""
    train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "resumed", stop_after=stop_after, progress=False)
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == stop_after
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    whole, resumed = Trainer(cfg, tmp_path / "whole"), Trainer(cfg, tmp_path / "resumed")
    whole.load()
    resumed.load()
    return whole, resumed


def test_resumed_run_equals_uninterrupted(tmp_path):
    a, b = whole_and_resumed(tiny(), tmp_path, stop_after=3)
    assert a.step == b.step == 8
    for (n, p), q in zip(a.net.named_parameters(), b.net.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(a.E, b.E) and torch.equal(a.twin.x, b.twin.x)
    strip = lambda p: [line.split(",")[:1] + line.split(",")[2:] for line in p.read_text().splitlines()]
    assert strip(tmp_path / "whole" / "metrics.csv") == strip(tmp_path / "resumed" / "metrics.csv")


def test_head_learning_rate_and_its_change_on_resume(tmp_path):
    """lr_head scales the output layer's and the gain's learning rate; switching it on resume keeps every
    parameter's Adam state, and a two-group run resumes exactly."""
    train(tiny(), tmp_path / "a", stop_after=2, progress=False)
    t = Trainer(tiny(lr_head=0.1), tmp_path / "a")
    t.load()
    heads = [g for g in t.opt.param_groups if g["lr_scale"] == 0.1]
    assert len(t.opt.param_groups) == 2 and sorted(heads[0]["names"]) == ["gain", "out.bias", "out.weight"]
    assert all(int(t.opt.state[p]["step"]) == 2 for p in t.net.parameters())
    before = {n: p.detach().clone() for n, p in t.net.named_parameters()}
    t.train_step()
    lrs = {g["lr_scale"]: g["lr"] for g in t.opt.param_groups}
    assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0])
    assert all(int(t.opt.state[p]["step"]) == 3 for p in t.net.parameters())
    assert not torch.equal(before["gain"], t.net.gain)
    # a run saved before a schedule knob existed resumes with its default without recording a change
    meta = json.loads((tmp_path / "a" / "checkpoint.json").read_text())
    del meta["config"]["train"]["lr_head"]
    (tmp_path / "a" / "checkpoint.json").write_text(json.dumps(meta))
    old = Trainer(tiny(), tmp_path / "a")
    old.load()
    assert old.history == []
    # a run with two groups, interrupted and resumed, equals the uninterrupted one
    b, c = whole_and_resumed(tiny(lr_head=0.1), tmp_path, stop_after=5)
    assert all(torch.equal(p, q) for p, q in zip(b.net.parameters(), c.net.parameters()))


def test_weight_averaging(tmp_path):
    """ema keeps avg = d·avg + (1 − d)·θ after each step, d = min(ema, (1 + step)/(10 + step)); it may be switched
    on at a resume (starting from the current weights, recorded), the averaged network is the one validated, and
    a resumed run is exact."""
    t = Trainer(tiny(ema=0.75), tmp_path / "x")
    assert all(torch.equal(v, t.net.state_dict()[k]) for k, v in t.avg.state_dict().items())
    t2 = Trainer(tiny(ema=0.2), tmp_path / "y")
    for tr, ds in ((t, [0.1, 2 / 11, 0.25, 4 / 13]), (t2, [0.1, 2 / 11, 0.2, 0.2])):
        for step, d in enumerate(ds):
            avg0 = {k: v.clone() for k, v in tr.avg.state_dict().items()}
            tr.train_step()
            for k, v in tr.net.state_dict().items():
                assert torch.allclose(tr.avg.state_dict()[k], d * avg0[k] + (1 - d) * v, atol=1e-7), (step, k)
    assert not torch.equal(t.avg.gain, t.net.gain)
    # switched on at a resume: starts from the trained weights, recorded in the history
    train(tiny(), tmp_path / "a", stop_after=4, progress=False)
    t = Trainer(tiny(ema=0.75), tmp_path / "a")
    t.load()
    assert all(torch.equal(p, q) for p, q in zip(t.avg.parameters(), t.net.parameters()))
    assert t.history == [{"step": 4, "set": {"ema": 0.75}}]
    train(tiny(ema=0.75), tmp_path / "a", resume=True, progress=False)
    t = Trainer(tiny(ema=0.75), tmp_path / "a")
    t.load()
    last = (tmp_path / "a" / "metrics.csv").read_text().splitlines()[-1].split(",")
    va, _ = validate(t.cfg, t.avg)
    assert last[0] == "8" and float(last[7]) == pytest.approx(va, abs=1e-4)
    assert float(last[9]) == pytest.approx(validate(t.cfg, t.net)[0], abs=1e-4)
    # interrupted and resumed = uninterrupted, the average included
    b, c = whole_and_resumed(tiny(ema=0.75), tmp_path, stop_after=3)
    assert all(torch.equal(p, q) for p, q in zip(b.net.parameters(), c.net.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(b.avg.parameters(), c.avg.parameters()))


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny(), tmp_path, stop_after=2, progress=False)
    with pytest.raises(CheckpointError, match="train.N_iter differ"):
        train(tiny(N_iter=2), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds"):
        train(tiny(), tmp_path, progress=False)
    # runtime knobs may change, and the schedule (a warm restart), which is recorded
    train(tiny(max_steps=9, lr=1e-2, checkpoint_every_s=10.0), tmp_path, resume=True, stop_after=2, progress=False)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["schedule_history"] == [{"step": 2, "set": {"lr": 1e-2, "max_steps": 9}}]
    assert json.loads((tmp_path / "best" / "model.json").read_text())["schedule_history"] == meta["schedule_history"]


def test_resume_with_another_batch_size(tmp_path):
    train(tiny(), tmp_path, stop_after=2, progress=False)
    saved = Trainer(tiny(), tmp_path)
    saved.load()
    for Nt in (40, 5):  # a larger batch keeps every trajectory and adds fresh ones; a smaller one keeps the first
        t = Trainer(tiny(Nt=Nt), tmp_path)
        t.load()
        keep = min(Nt, 16)
        assert t.E.shape == (Nt, 1, 40) and t.twin.x.shape == (Nt, 40)
        assert torch.equal(t.E[:keep], saved.E[:keep]) and torch.equal(t.twin.x[:keep], saved.twin.x[:keep])
        assert all(torch.equal(p, q) for p, q in zip(t.net.parameters(), saved.net.parameters()))
        assert t.opt.state_dict()["state"][0]["exp_avg"].equal(saved.opt.state_dict()["state"][0]["exp_avg"])
        assert t.history == [{"step": 2, "set": {"Nt": Nt}}]
    fresh = Trainer(tiny(Nt=40), tmp_path / "new").twin.x
    t = Trainer(tiny(Nt=40), tmp_path)
    t.load()
    assert torch.equal(t.twin.x[16:], fresh[16:])  # the added trajectories are spun up on the attractor from the seed
    # the resized run trains, and its next checkpoint holds the new batch
    train(tiny(Nt=40), tmp_path, resume=True, stop_after=2, progress=False)
    t = Trainer(tiny(Nt=40), tmp_path)
    t.load()
    assert t.step == 4 and t.E.shape == (40, 1, 40) and torch.isfinite(t.E).all()
    assert t.history == [{"step": 2, "set": {"Nt": 40}}]


def test_teacher_target_is_the_enkf_n_analysis_mean_on_the_same_observations(tmp_path):
    """With teacher_weight w the target is w x̄^a + (1 - w) x, x̄^a the mean of an EnKF-N (N, xN) cycled on the
    training trajectories' own observations: replayed here by hand from the same initial ensembles."""
    from danlab.filters.ensemble import EnKF_N
    from danlab.twin import TwinStream
    cfg = tiny(teacher_weight=0.75, teacher_N=10, teacher_xN=1.5)
    tr = Trainer(cfg, tmp_path)
    ET0 = tr.E_teacher.clone()
    twin = TwinStream(tr.model, tr.observer, 16, cfg.seed, ids=None, dtype=torch.float32)
    targets = []
    orig = tr.teacher_target

    def spy(x, obs, w):
        out = orig(x, obs, w)
        targets.append(out[0])
        return out
    tr.teacher_target = spy
    tr.window_loss()
    ET, f = ET0, EnKF_N(N=10, xN=1.5)
    for k in range(cfg.train.N_iter):
        x, obs = twin.step()
        ET = f.analysis(tr.model(ET), obs, None)
        assert torch.allclose(targets[k], 0.75 * ET.mean(1) + 0.25 * x, atol=1e-5)
        assert (targets[k] - x).abs().max() > 1e-2  # the teacher moved the target away from the truth
    assert torch.allclose(tr.E_teacher, ET, atol=1e-5)


def test_teacher_target_lowers_the_gradient_noise(tmp_path):
    """The point of the teacher: near a good network, its analysis mean scatters far less around the network's
    analysis than the truth does, so the per-trajectory gradients agree more (a smaller gradient noise scale).
    Measured with the shipped network on the same trajectories, cycle and weights, truth vs teacher target."""
    net, meta = load_net(Path(__file__).parents[1] / "weights" / "l96_nf40_ne1")
    d = meta["trained_with"] | {"train": meta["trained_with"]["train"] | {"Nt": 24, "N_iter": 1, "teacher_weight": 1.0,
                                                                          "bf16": False, "ema": 0.0, "threads": 1}}
    tr = Trainer(TrainRunConfig.model_validate(d), tmp_path)
    tr.net.load_state_dict(net.state_dict())
    with torch.no_grad():
        for _ in range(150):  # the network's and the teacher's trajectories past their initial transient (~100 cycles)
            tr.E = tr.window_loss()[1]
    x, obs = tr.twin.step()
    targets = {"truth": x, "teacher": tr.teacher_target(x, obs, 1.0)[0]}
    Ea = tr.filter.analysis(tr.model(tr.E), obs, None)
    params = list(tr.net.parameters())
    noise = {}
    for name, target in targets.items():
        g = torch.stack([torch.cat([p.flatten() for p in torch.autograd.grad(
            (Ea[b] - target[b]).pow(2).mean(), params, retain_graph=True)]) for b in range(len(x))])
        noise[name] = float((g - g.mean(0)).pow(2).sum(1).mean())
    # measured: the teacher's mean lies ~0.115 from the network's analysis, the truth ~0.20 (and the teacher ~0.175
    # from the truth): a third of the residual variance, so about a third of the gradient noise
    assert noise["teacher"] < 0.5 * noise["truth"], noise


def test_resumed_run_with_a_teacher_equals_uninterrupted(tmp_path):
    a, b = whole_and_resumed(tiny(teacher_weight=0.5, teacher_N=8), tmp_path, stop_after=3)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert torch.equal(a.E_teacher, b.E_teacher) and torch.equal(a.E, b.E)
    # a teacher switched on at a resume starts from fresh ensembles and is recorded; switched off, it is dropped
    train(tiny(), tmp_path / "c", stop_after=2, progress=False)
    train(tiny(teacher_weight=1.0), tmp_path / "c", resume=True, stop_after=2, progress=False)
    meta = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    assert meta["schedule_history"] == [{"step": 2, "set": {"teacher_weight": 1.0}}]
    train(tiny(), tmp_path / "c", resume=True, stop_after=2, progress=False)
    t = Trainer(tiny(), tmp_path / "c")
    t.load()
    assert t.step == 6 and t.teacher is None
    # idle after the distillation (teacher_weight 0), the teacher is not checkpointed; switched on at a resume,
    # it starts around the current truths, not around stale ensembles
    from danlab.checkpoint import read_checkpoint
    from danlab.metrics import rmse
    from danlab.training.trainer import TRAIN_FORMAT
    train(tiny(distill_steps=2, teacher_N=8), tmp_path / "d", stop_after=4, progress=False)
    assert "state.E_teacher" not in read_checkpoint(tmp_path / "d", "checkpoint", TRAIN_FORMAT)[0]
    t = Trainer(tiny(distill_steps=2, teacher_N=8, teacher_weight=1.0), tmp_path / "d")
    t.load()
    assert float(rmse(t.E_teacher.mean(1), t.twin.x).max()) < 1.0  # members N(x, 1): the mean within ~1/sqrt(8)


def test_distillation_steps_regress_the_analysis_of_the_teachers_forecast(tmp_path):
    """A distillation step is one cycle: a_θ's analyses of the teacher's forecast mean and of the forecast of its
    own carried state, both against the teacher's analysis mean, the model not differentiated. Replayed by hand from the same
    teacher ensembles, states and weights."""
    from danlab.filters.ensemble import EnKF_N
    from danlab.twin import TwinStream
    cfg = tiny(distill_steps=2, teacher_weight=0.0, teacher_N=10)  # distillation targets the teacher regardless
    tr = Trainer(cfg, tmp_path)
    ET, E0, net = tr.E_teacher.clone(), tr.E.clone(), copy.deepcopy(tr.net)
    twin = TwinStream(tr.model, tr.observer, 16, cfg.seed, ids=None, dtype=torch.float32)
    loss, E, x = tr.distill_loss()
    x2, obs = twin.step()
    EfT = tr.model(ET)
    xa = EnKF_N(N=10, xN=cfg.train.teacher_xN).analysis(EfT, obs, None).mean(1)
    a = lambda xf: xf + net(xf, obs.HtRinv_innovation(xf.mean(1)))
    Ea_teacher, Ea_own = a(EfT.mean(1, keepdim=True)), a(tr.model(E0))
    assert torch.equal(x, x2) and torch.allclose(E, Ea_own, atol=1e-5)
    expected = 0.5 * ((Ea_teacher - xa.unsqueeze(1)).pow(2).mean() + (Ea_own - xa.unsqueeze(1)).pow(2).mean())
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # the gradient does not flow into the model's forecast of the carried state
    loss.backward()
    assert E0.grad is None and tr.net.gain.grad is not None
    # the network's trajectories start from its last analyses of the teacher's forecasts; then windows follow
    seen = []
    orig = tr.distill_loss
    tr.distill_loss = lambda: seen.append(orig()) or seen[-1]
    tr.train_step()
    assert tr.twin.k == 2 and torch.equal(tr.E, seen[0][1].detach())
    tr.train_step()
    k, ET = tr.twin.k, tr.E_teacher.clone()
    tr.train_step()  # step 2: a window of N_iter cycles against the truth: the teacher is no longer cycled
    assert tr.twin.k == k + cfg.train.N_iter and torch.equal(tr.E_teacher, ET)
    # interrupted inside the distillation and resumed = uninterrupted, across the switch to windows
    a, b = whole_and_resumed(tiny(distill_steps=4, teacher_weight=0.5, teacher_N=8), tmp_path / "r", stop_after=3)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert torch.equal(a.E_teacher, b.E_teacher) and torch.equal(a.E, b.E)
    with pytest.raises(ValueError, match="N <= teacher_N"):
        tiny(distill_steps=2, N=12, teacher_N=10)


def test_stored_distillation_reuses_teacher_pairs_over_epochs(tmp_path):
    """distill_cycles > 0: the teacher's (forecast mean, observations) → analysis mean pairs are made once, from a
    stream of their own, and drawn in shuffled minibatches of 2 Nt; each epoch visits every pair once; the training
    trajectories wait for the windows; a run interrupted inside it and resumed equals an uninterrupted one."""
    from danlab.observations import Obs
    cfg = tiny(distill_steps=4, distill_cycles=5, distill_burn_in=2, teacher_N=8)  # 3 × 32 pairs: 3 steps an epoch
    tr = Trainer(cfg, tmp_path / "a")
    p = tr.distill_set()
    assert len(p["x"]) == 3 * 32 and p["Ef"].shape == (96, 1, 40)
    err = lambda a: float((a - p["x"]).pow(2).mean().sqrt())
    assert err(p["xa"]) < err(p["Ef"][:, 0])  # the targets are analyses: closer to the truth than the forecasts
    assert all(torch.equal(v, w) for v, w in zip(p.values(), Trainer(cfg, tmp_path / "b").distill_set().values())
               if isinstance(v, torch.Tensor))  # a function of the seed alone
    assert not any(torch.equal(tr.twin.x, x) for x in p["x"].view(3, 32, 40))  # not the training trajectories
    E0, x0, net = tr.E.clone(), tr.twin.x.clone(), copy.deepcopy(tr.net)
    loss, Ea, x = tr.stored_distill_loss()
    idx = tr.perm[1][:32]
    obs = Obs(p["y"][idx], p["mask"][idx], p["sigma"])
    expected = (p["Ef"][idx] + net(p["Ef"][idx], obs.HtRinv_innovation(p["Ef"][idx].mean(1))) - p["xa"][idx, None]).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and torch.equal(x, p["x"][idx])
    seen = []
    for _ in range(3):
        seen.append(tr.perm[1][(tr.step % 3) * 32:(tr.step % 3 + 1) * 32])
        tr.train_step()
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(96))  # one epoch: every pair once
    assert tr.twin.k == 0 and torch.equal(tr.E, E0) and torch.equal(tr.twin.x, x0) and not tr.teacher_in_use()
    tr.train_step()  # the next epoch reshuffles
    assert tr.perm[0] == 1 and not torch.equal(tr.perm[1], torch.cat(seen))
    tr.train_step()  # step 4: a window from the initial states, against the truth
    assert tr.twin.k == cfg.train.N_iter
    a, b = whole_and_resumed(cfg, tmp_path / "r", stop_after=2)
    assert all(torch.equal(u, v) for u, v in zip(a.net.parameters(), b.net.parameters())) and torch.equal(a.E, b.E)
    with pytest.raises(ValueError, match="distill_steps > 0"):
        tiny(distill_cycles=5)
    failing = Trainer(cfg, tmp_path / "failing")
    failing.threshold = 0.0  # every teacher trajectory counts as lost: no pair is kept, and it says so
    with pytest.raises(ValueError, match="^train.distill_cycles: the teacher kept 0 pairs, fewer than one minibatch of 32"):
        failing.distill_set()
    with pytest.raises(ValueError, match="distill_burn_in"):
        tiny(distill_steps=2, distill_cycles=5, distill_burn_in=5)


def test_distill_lr_makes_two_phases_each_warmed_up_the_windows_with_a_fresh_optimiser(tmp_path):
    tc = tiny(distill_steps=10, distill_lr=1e-3, lr=3e-4, lr_min=1e-5, warmup=2, max_steps=32).train
    assert lr_at(0, tc) == pytest.approx(5e-4) and lr_at(1, tc) == lr_at(9, tc) == 1e-3
    assert lr_at(10, tc) == pytest.approx(1.5e-4) and lr_at(11, tc) == pytest.approx(3e-4)
    assert lr_at(22, tc) == pytest.approx((3e-4 + 1e-5) / 2) and lr_at(32, tc) == pytest.approx(1e-5)
    one = tiny(distill_steps=10, lr=3e-4, warmup=2, max_steps=30).train  # without it: one cosine over all steps
    assert lr_at(10, one) < lr_at(9, one) < 3e-4
    # the optimiser's moments are cleared at the switch, and only there
    tr = Trainer(tiny(distill_steps=2, distill_cycles=4, distill_burn_in=1, distill_lr=1e-3, teacher_N=8), tmp_path)
    tr.train_step()
    tr.train_step()
    v = {id(p): tr.opt.state[p]["exp_avg_sq"].clone() for p in tr.net.parameters()}
    tr.train_step()  # step 2: the first window, from a fresh state: one Adam step's moments
    p = tr.net.gain
    assert tr.opt.state[p]["step"] == 1 and torch.allclose(tr.opt.state[p]["exp_avg_sq"], 0.001 * p.grad.pow(2))
    assert not torch.allclose(tr.opt.state[p]["exp_avg_sq"], 0.999 * v[id(p)] + 0.001 * p.grad.pow(2))


def test_semisupervised_loss_is_eq15_over_every_analysis_of_the_window(tmp_path):
    """L = mean over the N_iter analyses x^a_k of |y_k+1 - H M(x^a_k)|² / Ny, replayed by hand; the last
    observations are then assimilated into the carried state; with N_iter = 1 the loss has a gradient."""
    from danlab.twin import TwinStream
    for N_iter in (1, 3):
        cfg = tiny(loss="semisupervised", N_iter=N_iter)
        tr = Trainer(cfg, tmp_path / str(N_iter))
        E0, net = tr.E.clone(), copy.deepcopy(tr.net)
        twin = TwinStream(tr.model, tr.observer, 16, cfg.seed, ids=None, dtype=torch.float32)
        loss, E, _ = tr.window_loss()
        a = lambda Ef, obs: Ef + net(Ef, obs.HtRinv_innovation(Ef.mean(1)))
        _, obs = twin.step()
        Ef, expected = tr.model(E0), 0.0
        for _ in range(N_iter):
            Ea = a(Ef, obs)
            _, obs = twin.step()
            Ef = tr.model(Ea)
            expected = expected + (obs.y - obs.mask * Ef[:, 0]).pow(2).sum(-1).div(40).mean()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()) / N_iter, rel=1e-5)
        assert torch.allclose(E, a(Ef, obs).detach(), atol=1e-5) and tr.twin.k == N_iter + 1
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tr.net.parameters())
        assert float(tr.net.gain.grad.abs()) > 0


def test_semisupervised_training_needs_no_truth(tmp_path):
    """The truth the trainer sees is poisoned (NaN): the loss, the resets and so the weights never see it, and the
    semi-supervised run still learns (its loss falls) and validates against the real truth."""
    cfg = tiny(loss="semisupervised", max_steps=150, val_every=1000, Nt=32, N_iter=2)
    tr = Trainer(cfg, tmp_path)
    step = tr.twin.step
    tr.twin.step = lambda: (lambda x, obs: (torch.full_like(x, float("nan")), obs))(*step())
    losses = [tr.train_step()[0] for _ in range(150)]
    assert all(math.isfinite(v) for v in losses) and all(torch.isfinite(p).all() for p in tr.net.parameters())
    # measured: validation aRMSE 0.443 untrained, 0.356 after these 150 steps (0.350 with the supervised loss)
    trained, fresh = validate(cfg, tr.net, cycles=100)[0], validate(cfg, Trainer(cfg, tmp_path / "fresh").net, cycles=100)[0]
    assert trained < 0.9 * fresh, (trained, fresh)
    with pytest.raises(ValueError, match="teacher_weight"):
        tiny(loss="semisupervised", distill_steps=3)


def test_energy_and_crps_losses_score_the_ensemble_of_every_cycle_of_the_window(tmp_path):
    """loss energy / crps = mean over the N_iter cycles of the score of the analysis ensemble against the truth,
    replayed by hand with the same perturbed observations; an ensemble loss needs N >= 2."""
    from danlab.filters.base import centred_normal
    from danlab.metrics import crps, energy_score
    from danlab.rng import BatchRNG
    from danlab.twin import TwinStream
    for loss, score in (("energy", energy_score), ("crps", crps)):
        cfg = tiny(loss=loss, N=3, perturb_obs=0.5)
        tr = Trainer(cfg, tmp_path / loss)
        E, net = tr.E.clone(), copy.deepcopy(tr.net)
        twin = TwinStream(tr.model, tr.observer, 16, cfg.seed, ids=None, dtype=torch.float32)
        rng = BatchRNG(cfg.seed, "perturb", 16)
        got, _, _ = tr.window_loss()
        expected = 0.0
        for _ in range(cfg.train.N_iter):
            x, obs = twin.step()
            Ef = tr.model(E)
            zeta_n = obs.HtRinv_innovation(Ef - 0.5 * obs.sigma * centred_normal(Ef, rng))
            E = Ef + net(Ef, obs.HtRinv_innovation(Ef.mean(1)), zeta_n)
            expected = expected + score(E, x).mean()
        assert float(got.detach()) == pytest.approx(float(expected.detach()) / cfg.train.N_iter, rel=1e-5)
        got.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tr.net.parameters())
    with pytest.raises(ValueError, match="N >= 2"):
        tiny(loss="energy")
    with pytest.raises(ValueError, match="perturb_obs"):
        tiny(perturb_obs=1.0)
    with pytest.raises(ValueError, match="perturb_obs"):
        tiny(N=4, perturb_obs=1.0, distill_steps=2)


def test_perturbed_observations_spread_the_members_not_the_mean_and_travel_with_the_network(tmp_path):
    """perturb_obs: the members' innovations move by -perturb σ ε_n with ε centred over the members, so the mean
    analysis of a network linear in zeta_n is unchanged; an exported network evaluates with the value it was trained
    with unless the filter says otherwise; a resumed run draws the same perturbations as an uninterrupted one."""
    from danlab.observations import Observer
    from danlab.rng import BatchRNG
    net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1)).eval()  # output g zeta_n + CNN(...): the CNN's last layer is 0
    obs = Observer(40).observe(torch.randn(50, 40), BatchRNG(0, "o", 50))
    E = torch.randn(50, 5, 40)
    plain, pert = Learned.from_net(net, 5), Learned.from_net(net, 5, perturb=1.0)
    with torch.no_grad():
        Ea0, Ea1 = plain.analysis(E, obs, None), pert.analysis(E, obs, BatchRNG(0, "f", 50))
    assert torch.allclose(Ea0.mean(1), Ea1.mean(1), atol=1e-5) and not torch.allclose(Ea0, Ea1)
    eps = (Ea1 - Ea0) / float(net.gain.detach())  # g σ ε_n with σ = 1
    # centred, and of unit variance over the members (the stochastic EnKF's N / (N - 1) rescaling); 2,000 sites
    assert torch.allclose(eps.mean(1), torch.zeros(50, 40), atol=1e-5)
    assert abs(float(eps.var(1, unbiased=False).mean()) - 1) < 0.08
    with pytest.raises(ValueError, match="generator"):
        pert.analysis(E, obs, None)
    cfg = tiny(loss="energy", N=3, perturb_obs=0.7, max_steps=6)
    save_net(tmp_path / "net", Trainer(cfg, tmp_path / "t").net, {"trained_with": cfg.model_dump(mode="json")})
    l96 = tiny().model.build()
    assert Learned(checkpoint=str(tmp_path / "net")).prepare(l96, None, torch.float32, "cpu").perturb == 0.7
    assert Learned(checkpoint=str(tmp_path / "net"), perturb=0).prepare(l96, None, torch.float32, "cpu").perturb == 0
    a, b = whole_and_resumed(cfg, tmp_path / "resume", stop_after=2)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters())) and torch.equal(a.E, b.E)
    assert "val_spread" in (tmp_path / "resume" / "whole" / "metrics.csv").read_text().splitlines()[0]


def test_init_from_starts_a_run_from_a_saved_network(tmp_path):
    """train.init_from: a new run starts from the saved weights (the average too); a network of another
    architecture is refused naming the field; a resumed run carries its own weights (the folder may be gone)."""
    from danlab.config import ConfigError
    src = tiny(max_steps=3)
    train(src, tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")
    cfg = tiny(N=3, loss="energy", perturb_obs=1.0, init_from=str(tmp_path / "src"), ema=0.9, max_steps=4)
    train(cfg, tmp_path / "warm", stop_after=1, progress=False)
    tr = Trainer(cfg, tmp_path / "fresh")
    tr.warm_start(cfg.train.init_from)
    assert all(torch.equal(p, q) for p, q in zip(tr.net.parameters(), saved.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(tr.avg.parameters(), saved.parameters()))
    warm = Trainer(cfg, tmp_path / "warm")
    warm.load()  # one Adam step away from the saved weights, not from a random initialisation
    assert max(float((p - q).detach().abs().max()) for p, q in zip(warm.net.parameters(), saved.parameters())) < 0.05
    import shutil
    shutil.rmtree(tmp_path / "src")
    assert train(cfg, tmp_path / "warm", resume=True, progress=False)["step"] == 4
    # the exported ensemble network says how it was trained and how calibrated it is
    prov = export(tmp_path / "warm", tmp_path / "shipped", cycles=60, burn_in=10, batch=2, seed=0)
    ev = prov["evaluation"]
    assert len(ev["rank_hist"]) == 4 and sum(ev["rank_hist"]) == pytest.approx(1.0)
    assert ev["spread_ratio"] == pytest.approx(ev["spread"] / ev["armse"], rel=1e-9)
    text = (tmp_path / "shipped" / "README.md").read_text()
    assert "energy score of its 3 members" in text and "perturbed by 1.0" in text and "init_from" in text
    other = TINY | {"net": {"Nf": 8, "Nbl": 1, "Nl": 3}}
    train(TrainRunConfig.model_validate(json.loads(json.dumps(other)) | {"train": TINY["train"] | {"max_steps": 1}}),
          tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="train.init_from: .* net.Nl = 3, this run's net.Nl is 2$"):
        train(tiny(init_from=str(tmp_path / "other")), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()


def test_init_from_grows_a_network_by_blocks_that_start_as_the_identity(tmp_path):
    """train.init_from with more residual blocks (net.Nbl) than the saved network: the grown network computes
    exactly what the saved one did, then its new blocks train; fewer blocks, or another change, are refused."""
    from danlab.config import ConfigError
    train(tiny(max_steps=3), tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")
    grown_cfg = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"Nbl": 3}, "train": TINY["train"] | {"init_from": str(tmp_path / "src"), "max_steps": 4, "ema": 0.9}})
    tr = Trainer(grown_cfg, tmp_path / "grown")
    before = [p.detach().clone() for p in tr.net.blocks[1:].parameters()]
    tr.warm_start(grown_cfg.train.init_from)
    assert len(tr.net.blocks) == 3 and torch.equal(tr.net.inp.weight, saved.inp.weight)
    assert torch.equal(tr.net.blocks[1].f[0].weight, before[0])  # a new block keeps its random first layer...
    assert not tr.net.blocks[1].f[-1].weight.any() and not tr.avg.blocks[2].f[-1].bias.any()  # ...its last is zero
    E, zeta = torch.randn(4, 1, 40), torch.randn(4, 40)
    with torch.no_grad():
        saved.train(), tr.net.train()
        assert torch.equal(tr.net(E, zeta), saved(E, zeta)) and torch.equal(tr.avg.train()(E, zeta), saved(E, zeta))
    train(grown_cfg, tmp_path / "grown_run", progress=False)
    trained, _ = load_net(tmp_path / "grown_run")
    assert trained.blocks[2].f[-1].weight.abs().max() > 0  # the new blocks learn
    shrink = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"Nbl": 0}, "train": TINY["train"] | {"init_from": str(tmp_path / "src")}})
    with pytest.raises(ConfigError, match="net.Nbl = 1, this run's net.Nbl is 0 .*can only grow"):
        train(shrink, tmp_path / "shrunk", progress=False)
    narrower = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"Nbl": 2, "Nf": 4}, "train": TINY["train"] | {"init_from": str(tmp_path / "src")}})
    with pytest.raises(ConfigError, match="net.Nf = 8, this run's net.Nf is 4 .*can only grow"):
        train(narrower, tmp_path / "narrower", progress=False)


def test_init_from_widens_a_network_whose_new_channels_start_unheard(tmp_path):
    """train.init_from with more filters (net.Nf) than the saved network, and more blocks: the stored channels keep
    their weights and never read the new ones, the new channels reach the output through zero weights, so the
    wider network computes what the saved one did (to float32 round-off), then the new channels train."""
    train(tiny(max_steps=3), tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")
    wide_cfg = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"Nf": 12, "Nbl": 2}, "train": TINY["train"] | {"init_from": str(tmp_path / "src"),
                                                                           "max_steps": 4, "ema": 0.9}})
    tr = Trainer(wide_cfg, tmp_path / "wide")
    fresh_inp = tr.net.inp.weight.detach().clone()
    tr.warm_start(wide_cfg.train.init_from)
    w = tr.net.blocks[0].f[0].weight
    assert w.shape == (12, 12, 5) and torch.equal(w[:8, :8], saved.blocks[0].f[0].weight)
    assert not w[:8, 8:].any() and w[8:].abs().min() > 0  # stored outputs deaf to new inputs; new rows random
    assert torch.equal(tr.net.inp.weight[8:], fresh_inp[8:]) and torch.equal(tr.net.inp.bias[:8], saved.inp.bias)
    assert not tr.net.out.weight[:, 8:].any() and torch.equal(tr.net.out.weight[:, :8], saved.out.weight)
    assert all(torch.equal(p, q) for p, q in zip(tr.net.parameters(), tr.avg.parameters()))
    E, zeta = 3 + 2 * torch.randn(4, 1, 40), torch.randn(4, 40)
    with torch.no_grad():
        saved.train(), tr.net.train()
        ref = saved(E, zeta)
        assert float((tr.net(E, zeta) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        saved.eval(), tr.net.eval()
        assert float((tr.net(E, zeta) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # the inference path too
    train(wide_cfg, tmp_path / "wide_run", progress=False)
    trained, _ = load_net(tmp_path / "wide_run")
    assert trained.out.weight[:, 8:].abs().max() > 0 and trained.cfg.Nf == 12  # the new channels learn


def test_init_from_gives_a_network_a_gated_gain_that_starts_at_zero(tmp_path):
    """train.init_from into the same network with net.gate: the gate's convolution starts at zero, so the network
    computes what the saved one did, to the bit; it trains at the head's rate (lr × lr_head) and learns."""
    train(tiny(max_steps=3), tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")
    gated_cfg = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"gate": 3}, "train": TINY["train"] | {"init_from": str(tmp_path / "src"), "max_steps": 4,
                                                                  "ema": 0.9, "lr_head": 0.1}})
    tr = Trainer(gated_cfg, tmp_path / "gated")
    tr.warm_start(gated_cfg.train.init_from)
    assert not tr.net.gate.weight.any() and not tr.avg.gate.bias.any()
    body, head = ([id(p) for p in grp["params"]] for grp in tr.opt.param_groups)  # Trainer.param_groups' order
    assert id(tr.net.gate.weight) in head and id(tr.net.inp.weight) in body
    E, zeta = 3 + 2 * torch.randn(4, 1, 40), torch.randn(4, 40)
    with torch.no_grad():
        for mode in (True, False):
            saved.train(mode), tr.net.train(mode)
            assert torch.equal(tr.net(E, zeta), saved(E, zeta))
    train(gated_cfg, tmp_path / "gated_run", progress=False)
    trained, _ = load_net(tmp_path / "gated_run")
    assert trained.cfg.gate == 3 and trained.gate.weight.abs().max() > 0
    back = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "train": TINY["train"] | {"init_from": str(tmp_path / "gated_run")}})
    from danlab.config import ConfigError
    with pytest.raises(ConfigError, match="net.gate = 3, this run's net.gate is 0 .*can only grow"):
        train(back, tmp_path / "ungated", progress=False)


def test_train_only_fits_the_named_parameters_and_leaves_the_rest_as_stored(tmp_path):
    """train.train_only = [gate.] on a network given a gate by init_from: the gate learns, every other parameter (and
    its weight average) stays the stored one's to the bit; a resumed run equals an uninterrupted one; a resume with
    train_only unset trains the whole network; a prefix that names no parameter is refused by name."""
    train(tiny(max_steps=3), tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")

    def cfg(**kw):
        return TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
            "net": TINY["net"] | {"gate": 3}, "train": TINY["train"] | {
                "init_from": str(tmp_path / "src"), "max_steps": 6, "ema": 0.9, "train_only": ["gate."]} | kw})

    train(cfg(), tmp_path / "whole", progress=False)
    train(cfg(), tmp_path / "split", progress=False, stop_after=3)
    train(cfg(), tmp_path / "split", resume=True, progress=False)
    whole, split = load_net(tmp_path / "whole")[0], load_net(tmp_path / "split")[0]
    assert whole.gate.weight.abs().max() > 0
    for n, v in whole.state_dict().items():
        assert torch.equal(v, split.state_dict()[n]), n
        if not n.startswith("gate."):
            assert torch.equal(v, saved.state_dict()[n]), n
    ckpt, _ = read_checkpoint(tmp_path / "whole", "checkpoint", TRAIN_FORMAT)
    assert torch.equal(ckpt["net.inp.weight"], saved.state_dict()["inp.weight"])  # the raw weights too
    train(cfg(max_steps=8, train_only=None), tmp_path / "whole", resume=True, progress=False)
    ckpt, _ = read_checkpoint(tmp_path / "whole", "checkpoint", TRAIN_FORMAT)
    assert not torch.equal(ckpt["net.inp.weight"], saved.state_dict()["inp.weight"])
    with pytest.raises(ValueError, match="train.train_only: 'gates.' names no parameter .*gate"):
        cfg(train_only=["gates."])


def test_training_stops_at_its_wall_clock_budget_and_validates_there(tmp_path):
    out = train(tiny(max_steps=10_000, val_every=10_000), tmp_path, progress=False, max_wall_s=1e-9)
    assert out["step"] == 1
    last = (tmp_path / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "1" and float(last[7]) > 0
    assert (tmp_path / "curve.png").stat().st_size > 1000  # the curve is drawn at each validation
    with pytest.raises(ValueError, match="teacher_weight"):
        tiny(teacher_weight=0.5, loss="semisupervised")


def test_time_to_accuracy_benchmark_stops_at_its_budget_and_writes_its_row(tmp_path):
    spec = importlib.util.spec_from_file_location("tta", Path(__file__).parents[1] / "benchmarks" / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    tiny_net = ["net.Nf=4", "net.Nbl=1", "net.Nl=1", "train.Nt=8", "train.N_iter=2", "train.distill_steps=2",
                "train.val_cycles=30", "train.val_burn_in=10", "train.val_batch=2", "train.teacher_N=6"]
    out = tmp_path / "tta"
    tta.main(["--recipe", "default", "--budget-h", "1e-4", "--threads", "1", "--out-dir", str(tmp_path / "runs"),
              "--out", str(out)] + [f"--set={s}" for s in tiny_net])
    (row,) = json.loads(out.with_suffix(".json").read_text())["recipes"]
    assert row["name"] == "default" and 1 <= row["steps"] < 20_000 and row["machine"]["cores"] >= 1
    assert set(row["hours_to"]) == set(tta.THRESHOLDS) and row["final_val_armse"] > 0
    assert row["config"]["train"]["distill_steps"] == 2 and row["load"]["cpu_per_wall"] > 0
    assert "| default |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 1000
    # a run entered from elsewhere is merged as its own row
    tta.main(["--from-run", row["run_dir"], "--name", "again", "--out", str(out)])
    assert [r["name"] for r in json.loads(out.with_suffix(".json").read_text())["recipes"]] == ["default", "again"]


def _saved_net(tmp_path):
    net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1))
    save_net(tmp_path, net, {"trained_with": {}})
    return net


def test_network_roundtrip_and_refusals(tmp_path):
    net = _saved_net(tmp_path)
    back, meta = load_net(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), back.parameters()))
    tensor_file = tmp_path / json.loads((tmp_path / "model.json").read_text())["tensors"]
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_net(tmp_path)
    tensor_file.write_bytes(data)
    side = json.loads((tmp_path / "model.json").read_text())
    side["net"]["Nf"] = 8  # mismatched architecture
    (tmp_path / "model.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="shape"):
        load_net(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_net(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_net(tmp_path / "nowhere")


def test_a_reflect_network_starts_from_a_plain_one_trains_on_ks_and_is_refused_on_lorenz96(tmp_path):
    """net.reflect changes no weight: train.init_from takes a network trained without it (the same tensors), the
    averaged network trains on KS (whose dynamics have the symmetry) and keeps the flag in its sidecar, and
    the learned filter refuses it on a model without the symmetry, in one line; filter.reflect sets or clears the
    flag of a stored network at evaluation, with the same weights."""
    from danlab.config import KSConfig, Lorenz96Config
    train(tiny(max_steps=2), tmp_path / "plain", progress=False)
    plain, _ = load_net(tmp_path / "plain")
    d = json.loads(json.dumps(TINY))
    cfg = TrainRunConfig.model_validate(d | {"model": {"name": "ks"}, "net": d["net"] | {"reflect": True},
                                             "train": d["train"] | {"init_from": str(tmp_path / "plain"),
                                                                    "max_steps": 3, "val_every": 3}})
    tr = Trainer(cfg, tmp_path / "sym")
    tr.warm_start(cfg.train.init_from)
    assert tr.net.cfg.reflect and all(torch.equal(a, b) for a, b in zip(tr.net.state_dict().values(),
                                                                        plain.state_dict().values()))
    train(cfg, tmp_path / "sym", progress=False)
    sym, meta = load_net(tmp_path / "sym")
    assert sym.cfg.reflect and meta["trained_with"]["net"]["reflect"]
    assert not torch.equal(sym.inp.weight, plain.inp.weight)  # it trained
    f = Learned(checkpoint=str(tmp_path / "sym"))
    f.prepare(KSConfig().build(), None, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="net.reflect: the model Lorenz96 is not symmetric") as err:
        f.prepare(Lorenz96Config().build(), None, torch.float32, "cpu")
    assert "\n" not in str(err.value)
    for path, flag in ((tmp_path / "plain", True), (tmp_path / "sym", False)):
        g = Learned(checkpoint=str(path), reflect=flag).prepare(KSConfig().build(), None, torch.float32, "cpu")
        stored, _ = load_net(path)
        assert g.net.cfg.reflect is flag and g.resolved() == {"reflect": flag}
        assert all(torch.equal(a, b) for a, b in zip(g.net.state_dict().values(), stored.state_dict().values()))
    with pytest.raises(CheckpointError, match="net.reflect: the model Lorenz96"):
        Learned(checkpoint=str(tmp_path / "plain"), reflect=True).prepare(Lorenz96Config().build(), None,
                                                                          torch.float32, "cpu")


def test_a_pickle_is_never_loaded(tmp_path):
    net = _saved_net(tmp_path)
    side = json.loads((tmp_path / "model.json").read_text())
    torch.save(net.state_dict(), tmp_path / side["tensors"])  # a pickle in place of the safetensors file
    import hashlib
    side["sha256"] = hashlib.sha256((tmp_path / side["tensors"]).read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_net(tmp_path)


def test_learned_filter_needs_a_checkpoint():
    with pytest.raises(CheckpointError, match="checkpoint"):
        Learned().prepare(None, None, torch.float32, "cpu")


def gpu_continue_module():
    spec = importlib.util.spec_from_file_location("gpu_continue", Path(__file__).parents[1] / "scripts" / "gpu_continue.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    return gc


def test_gpu_continue_plans_a_warm_restart_within_its_budget(tmp_path):
    gc = gpu_continue_module()
    train(tiny(), tmp_path / "src", progress=False)  # 8 steps at N_t = 16
    # the plan is tested, not this machine's speed: fixed step and validation times, slower than the real ones so
    # that the run ends at its planned step before its budget's clock stops it (a loaded machine is slower)
    gc.time_steps = lambda run, overrides, warm, timed, fresh=None: (1.0, 1.0, 0.45)
    out = tmp_path / "out"
    gc.main([str(tmp_path / "src"), str(out), "--device", "cpu", "--threads", str(torch.get_num_threads()), "--budget-s", "130", "--nt", "24,32",
             "--warm", "1", "--timed", "2", "--vals", "2", "--peak-lr", "2e-3"])
    meta = json.loads((out / "run" / "checkpoint.json").read_text())
    cfg = TrainRunConfig.model_validate(meta["config"])
    (change,) = meta["schedule_history"]
    assert change["step"] == 8 and change["set"]["Nt"] in (24, 32) and change["set"]["max_steps"] == meta["step"] > 100
    assert lr_at(8, cfg.train) == pytest.approx(2e-3, rel=1e-5)  # the body restarts at the peak rate
    assert lr_at(meta["step"], cfg.train) == pytest.approx(cfg.train.lr_min)
    assert Trainer(cfg, out / "run").E.shape[0] == cfg.train.Nt
    net, side = load_net(out / "final")
    assert side["step"] == meta["step"]


def test_semisupervised_keeps_the_latest_network_not_the_truths_choice(tmp_path, monkeypatch):
    """Trained from observations only, the kept network is the latest validated one: the validation against the
    truth is monitoring, never a selection that the truth makes (a supervised run keeps the best one)."""
    import danlab.training.trainer as trainer_module
    scores = iter([0.30, 0.40, 0.50, 0.60, 0.70, 0.80])  # validation gets worse: a truth-based choice keeps the first
    monkeypatch.setattr(trainer_module, "validate", lambda cfg, net, cycles=None, **kw: (next(scores), 0.01))
    for loss, kept_step in (("semisupervised", 8), ("supervised", 4)):
        d = tmp_path / loss
        train(tiny(loss=loss, ema=0.0), d, progress=False)  # validated at steps 4 and 8
        assert json.loads((d / "best" / "model.json").read_text())["step"] == kept_step



def test_code_version_is_read_once_per_session_and_kept_across_resumes(tmp_path, monkeypatch):
    """A run records the code its process started with, not a commit made while it trains; a resume under other code
    adds that session, and exported weights say both."""
    import danlab.training.trainer as trainer_module
    versions = iter(["aaa", "changed-while-training"] + ["changed-while-training"] * 50)
    monkeypatch.setattr(trainer_module, "code_version", lambda: next(versions))
    train(tiny(), tmp_path / "run", stop_after=3, progress=False)
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["code_version"] == "aaa" and meta["code_versions"] == [{"step": 0, "code": "aaa"}]
    monkeypatch.setattr(trainer_module, "code_version", lambda: "bbb")
    train(tiny(), tmp_path / "run", resume=True, progress=False)
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["code_versions"] == [{"step": 0, "code": "aaa"}, {"step": 3, "code": "bbb"}]
    export(tmp_path / "run", tmp_path / "w", cycles=20, burn_in=5, batch=1)
    prov = json.loads((tmp_path / "w" / "provenance.json").read_text())
    assert prov["training_code_versions"] == meta["code_versions"]
    assert "code aaa (from step 0), bbb (from step 3)" in (tmp_path / "w" / "README.md").read_text()


def test_gpu_continue_starts_a_fresh_run_from_a_config_and_stops_at_its_budget(tmp_path):
    """A config file starts a fresh run with its own schedule (max_steps placed by the plan); a step time that the
    timing underestimated cannot make the run outlast its budget: it stops there, checkpointed and validated."""
    from danlab.config import to_yaml
    gc = gpu_continue_module()
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(to_yaml(tiny()))
    gc.time_steps = lambda run, overrides, warm, timed, fresh=None: (1e-5, 1e-3, 0.45)  # far too optimistic
    out = tmp_path / "out"
    gc.main([str(cfg_file), str(out), "--device", "cpu", "--threads", str(torch.get_num_threads()), "--budget-s", "3",
             "--nt", "16", "--vals", "1", "--set", "train.val_cycles=20", "--set", "train.val_burn_in=5"])
    meta = json.loads((out / "run" / "checkpoint.json").read_text())
    cfg = TrainRunConfig.model_validate(meta["config"])
    assert meta["schedule_history"] == [] and cfg.train.val_cycles == 20 and cfg.train.lr == tiny().train.lr
    assert cfg.train.max_steps > 10_000 and 0 < meta["step"] < cfg.train.max_steps  # planned far, stopped by the clock
    assert meta["wall_s"] < 3 + 2  # the budget, and the one step and validation that may cross it
    assert load_net(out / "final")[1]["step"] == meta["step"]
    with pytest.raises(SystemExit, match="fresh run"):
        gc.main([str(out / "run"), str(tmp_path / "o2"), "--device", "cpu", "--set", "train.lr=1e-3"])


def test_validation_from_a_stored_spun_up_start_equals_a_fresh_validation():
    """The trainer spins the held-out truth up once per session and resumes it at each validation: the scores are
    those of a validation that spins it up again, exactly, and the stored start is not consumed by a validation."""
    cfg = tiny(val_cycles=60, val_burn_in=10)
    net = Trainer(cfg, "unused").net
    start = validation_twin(cfg).state_dict()
    fresh = validate(cfg, net)
    assert validate(cfg, net, start=start) == fresh
    assert validate(cfg, net, start=start) == fresh  # the same start serves every validation
    assert validate(cfg, net, start=start, with_spread=True)[:2] == fresh
    twin = validation_twin(cfg)
    twin.step()
    assert validate(cfg, net, start=twin.state_dict()) != fresh  # the start is used: one cycle later, other scores


def test_trajectory_normalised_loss_weighs_each_trajectory_by_the_inverse_of_its_error():
    """loss_norm: trajectory keeps the loss value (the mean squared error) and gives the gradient
    mean(L) × mean_b ∇L_b / L_b, i.e. the gradient of mean(L) × mean_b log L_b: a trajectory with 10 times the
    error of another weighs the same, not 10 times more."""
    a, b = Trainer(tiny(Nt=6, loss_norm="trajectory"), "unused"), Trainer(tiny(Nt=6), "unused")
    for t in (a, b):  # one trajectory far from its truth: errors of very unequal sizes, the case that matters
        t.E = t.E.clone()
        t.E[0] += 3.0
    per_traj = []
    cycle_loss = b.cycle_loss
    b.cycle_loss = lambda E, t: per_traj.append(cycle_loss(E, t)) or per_traj[-1]
    la, _, _ = a.window_loss()
    lb, _, _ = b.window_loss()
    L = torch.stack(per_traj).mean(0)  # each trajectory's window loss, (Nt,)
    assert L.shape == (6,) and float(L.detach().max() / L.detach().min()) > 5
    assert float(la) == pytest.approx(float(lb), rel=1e-6) and float(lb) == pytest.approx(float(L.detach().mean()), rel=1e-6)
    params = list(b.net.parameters())
    plain = torch.cat([g.flatten() for g in torch.autograd.grad(L.mean(), params, retain_graph=True)])  # unweighted
    la.backward()
    (L.detach().mean() * L.log().mean()).backward()
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-9, msg=name)
    weighted = torch.cat([p.grad.flatten() for p in params])
    assert float(torch.nn.functional.cosine_similarity(plain, weighted, dim=0)) < 0.99  # another direction
    with pytest.raises(ValueError, match="loss_norm"):
        tiny(loss_norm="trajectory", loss="semisupervised")


def test_the_precision_input_tells_unobserved_sites_from_zero_innovations_and_can_be_added(tmp_path):
    """net.precision_input: a fifth channel, diag(H^T R^-1 H) per site. A site left unobserved and one observed
    with a zero innovation give the same zeta, so a network without it cannot tell them apart and one with it can;
    train.init_from adds it to a saved network with zero weights on the channel (the same analyses at step 0), its
    inference path equals its layers, and a network that needs it refuses to run without it."""
    from pydantic import ValidationError

    from danlab.nets import NetConfig
    from danlab.observations import Obs
    train(tiny(max_steps=3), tmp_path / "src", progress=False)
    saved, _ = load_net(tmp_path / "src")
    cfg = TrainRunConfig.model_validate(json.loads(json.dumps(TINY)) | {
        "net": TINY["net"] | {"precision_input": True}, "train": TINY["train"] | {"init_from": str(tmp_path / "src"), "ema": 0.9}})
    tr = Trainer(cfg, tmp_path / "widened")
    tr.warm_start(cfg.train.init_from)
    assert tr.net.inp.weight.shape[1] == 5 and not tr.net.inp.weight[:, 4].any()
    assert torch.equal(tr.net.inp.weight[:, :4], saved.inp.weight) and torch.equal(tr.avg.inp.weight, tr.net.inp.weight)
    # two observation networks with the same zeta: site 3 unobserved, or observed with y equal to the forecast there
    x = 8 + torch.randn(2, 1, 40)
    mask = torch.ones(2, 40)
    mask[:, 3] = 0
    y = x[:, 0] + torch.randn(2, 40)
    y[:, 3] = x[:, 0, 3]
    obs_a, obs_b = Obs(y * mask, mask, 1.0), Obs(y, torch.ones(2, 40), 1.0)
    old, new = Learned.from_net(saved.eval()), Learned.from_net(tr.net.eval())
    with torch.no_grad():
        assert torch.equal(obs_a.HtRinv_innovation(x[:, 0]), obs_b.HtRinv_innovation(x[:, 0]))
        za = old.analysis(x, obs_a, None)
        assert torch.equal(za, old.analysis(x, obs_b, None))  # blind to the difference
        torch.testing.assert_close(new.analysis(x, obs_a, None), za, rtol=0, atol=1e-6)  # step 0: the saved network
        tr.net.inp.weight[:, 4].normal_()
        assert not torch.allclose(new.analysis(x, obs_a, None), new.analysis(x, obs_b, None), atol=1e-4)
        layers = tr.net.train()(x, obs_a.HtRinv_innovation(x[:, 0]), None, obs_a.mask)
        torch.testing.assert_close(tr.net.eval()(x, obs_a.HtRinv_innovation(x[:, 0]), None, obs_a.mask), layers,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="precision_input"):
            tr.net(x, obs_a.HtRinv_innovation(x[:, 0]))
    with pytest.raises(ValidationError, match="only the kinds cnn and linear"):
        NetConfig(kind="simplified", precision_input=True)
    # it trains: the channel's weights leave zero, and the run's network keeps the channel
    train(cfg, tmp_path / "run", progress=False)
    trained, _ = load_net(tmp_path / "run")
    assert trained.cfg.precision_input and trained.inp.weight[:, 4].abs().max() > 0
    export(tmp_path / "run", tmp_path / "shipped", cycles=40, burn_in=10, batch=1, seed=0)  # evaluated with its input
    assert "the observation precision as a fifth input" in (tmp_path / "shipped" / "README.md").read_text()
