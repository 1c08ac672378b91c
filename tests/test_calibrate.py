"""`danlab calibrate`: a learned ensemble's observation perturbation chosen so that its spread matches its error,
recorded in the sidecar and taken by the filter as its default for that ensemble size."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from danlab.checkpoint import CheckpointError
from danlab.config import ConfigError, load_config
from danlab.experiments.calibrate import calibrate, calibrated_ratio
from danlab.experiments.run_config import RunConfig, learned_eval_data
from danlab.experiments.runner import run_experiment
from danlab.learned import Learned
from danlab.models import Lorenz96
from danlab.observations import Observer
from tests.test_cli import danlab

ROOT = Path(__file__).resolve().parents[1]
NE10 = ROOT / "weights" / "l96_nf40_ne10"


@pytest.fixture
def net_copy(tmp_path):
    d = tmp_path / "ne10"
    shutil.copytree(NE10, d, ignore=shutil.ignore_patterns("run", "stage1", "*.png", "*.csv"))
    meta = json.loads((d / "model.json").read_text())  # as exported: no calibration yet (the shipped one has one)
    meta.pop("calibrated", None)
    (d / "model.json").write_text(json.dumps(meta))
    return d


def prepared(d: Path, N: int, **kw) -> Learned:
    return Learned(checkpoint=str(d), N=N, **kw).prepare(Lorenz96(), Observer(40), torch.float32, "cpu")


def test_calibrated_ratio():
    assert calibrated_ratio(10) == pytest.approx(0.9535, abs=1e-4)
    assert calibrated_ratio(1_000_000) == pytest.approx(1.0, abs=1e-6)


def test_calibrate_keeps_the_nearest_ratio_and_records_it(net_copy):
    tensors = sorted(net_copy.glob("model-*.safetensors"))
    digest = hashlib.sha256(tensors[0].read_bytes()).hexdigest()
    trained = prepared(net_copy, 10).perturb
    r = calibrate(net_copy, [0.2, 0.6, 1.2], cycles=150, burn_in=50, batch=1, seed=7, overrides=["threads=1"], write=True)
    ratios = {p["perturb"]: p["spread_ratio"] for p in r["grid"]}
    # the perturbation sets the spread: more perturbation, more spread (by far, over this range)
    assert ratios[0.2] < ratios[0.6] < ratios[1.2]
    assert r["perturb"] == min(ratios, key=lambda p: abs(ratios[p] - calibrated_ratio(10)))
    assert r["N"] == 10 and r["seed"] == 7 and r["written"]
    meta = json.loads((net_copy / "model.json").read_text())
    assert meta["calibrated"]["perturb"] == r["perturb"] and len(meta["calibrated"]["grid"]) == 3
    assert hashlib.sha256(tensors[0].read_bytes()).hexdigest() == digest  # the tensors are not touched
    # the filter's default for N = 10 is now the calibrated value; another N, or an explicit value, is not affected
    assert prepared(net_copy, 10).perturb == r["perturb"] != trained
    assert prepared(net_copy, 5).perturb == trained
    assert prepared(net_copy, 10, perturb=0.9).perturb == 0.9
    # an evaluation's summary says which perturbation its spread came from
    data = learned_eval_data(meta["trained_with"], net_copy, cycles=30, burn_in=5, batch=1)
    assert run_experiment(load_config(RunConfig, data=data | {"threads": 1}), None)["perturb"] == r["perturb"]


def test_calibrate_refuses_what_it_cannot_calibrate(net_copy):
    with pytest.raises(ConfigError, match="single state"):
        calibrate(ROOT / "weights" / "l96_nf40_ne1", [0.5], cycles=20, burn_in=5, batch=1)
    with pytest.raises(ConfigError, match="no values"):
        calibrate(net_copy, [], cycles=20, burn_in=5, batch=1)


@pytest.mark.parametrize("bad", [{"perturb": "x", "N": 10}, {"perturb": -1, "N": 10}, [0.5], {"N": 10}])
def test_a_damaged_calibration_is_named(net_copy, bad):
    meta = json.loads((net_copy / "model.json").read_text())
    (net_copy / "model.json").write_text(json.dumps(dict(meta, calibrated=bad)))
    with pytest.raises(CheckpointError, match="calibrated must be a mapping"):
        prepared(net_copy, 10)


def test_cli_calibrate(net_copy, tmp_path):
    r = danlab("calibrate", str(net_copy), "--grid", "0.5,0.7", "--cycles", "60", "--burn-in", "20", "--batch", "1",
               "--set", "threads=1", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["perturb"] in (0.5, 0.7) and not s["written"] and "calibrated" not in json.loads((net_copy / "model.json").read_text())
    for args, msg in [(["--write", "--seed", "0"], "seed 0 is the one every evaluation scores on"),
                      (["--grid", "infl=1,2"], "only the perturbation"), (["--grid=-1:1:1"], "greater than or equal to 0"),
                      (["--N", "1"], "single state")]:
        r = danlab("calibrate", str(net_copy), "--cycles", "20", "--burn-in", "5", "--batch", "1", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_an_ensemble_recentred_on_a_control_has_the_control_as_its_mean(tmp_path):
    """filter.control: the control state is forecast and analysed by its own network exactly as a single-state
    filter would (bit for bit), the ensemble's analysis mean is that control (to float32 round-off) and its members
    keep their spread; a restart resets both; the configurations that cannot mean anything are refused."""
    from pydantic import ValidationError

    from danlab.learned import Recentred, save_net
    from danlab.nets import NetConfig, build_net
    from danlab.rng import BatchRNG
    from danlab.training.train_config import TrainRunConfig
    torch.manual_seed(0)
    ens, ctl = (build_net(NetConfig(Nf=4, Nbl=1, Nl=1)).eval() for _ in range(2))
    with torch.no_grad():  # a CNN that does something (its last layer starts at 0) and differs between the two
        for net in (ens, ctl):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model, observer = Lorenz96(), Observer(40)
    f, g, plain = (Learned.from_net(ens, 6, perturb=0.5, control=ctl), Learned.from_net(ctl),
                   Learned.from_net(ens, 6, perturb=0.5))
    x = model.spinup(8 + torch.randn(3, 40), 5.0)
    E0 = x.unsqueeze(1) + torch.randn(3, 6, 40)
    carry, xc, Ep = f.start(E0), E0.mean(-2, keepdim=True), E0
    obs_rng, f_rng, p_rng = BatchRNG(0, "o", 3), BatchRNG(0, "f", 3), BatchRNG(0, "f", 3)
    with torch.no_grad():
        for _ in range(20):
            x = model(x)
            obs = observer.observe(x, obs_rng)
            carry, Ef, Ea, Es, n = f.step(carry, model, obs, f_rng)
            xc = g.cycle(xc, model, obs, None)[1]
            Ep = plain.cycle(Ep, model, obs, p_rng)[1]
            assert isinstance(carry, Recentred) and Es is None and n == 0 and carry.E is Ea
            assert torch.equal(carry.control, xc)
            torch.testing.assert_close(Ea.mean(-2), xc[:, 0], rtol=0, atol=1e-5)
    assert float(Ea.std(-2).mean()) > 0.05  # the members are not collapsed onto the control
    assert not torch.allclose(Ep.mean(-2), xc[:, 0], atol=1e-2)  # the same ensemble without recentring: another mean
    bad = torch.tensor([False, True, False])
    r = f.restart(carry, bad, x)
    assert torch.equal(r.E[1], x[1].expand(6, 40)) and torch.equal(r.control[1, 0], x[1])
    assert torch.equal(r.E[0], carry.E[0]) and torch.equal(r.control[2], carry.control[2])
    # from folders: the control network is loaded beside the ensemble's
    meta = {"trained_with": TrainRunConfig().model_dump(mode="json")}
    save_net(tmp_path / "ens", ens, meta)
    save_net(tmp_path / "ctl", ctl, meta)
    h = Learned(checkpoint=str(tmp_path / "ens"), N=6, perturb=0.5, control=str(tmp_path / "ctl")).prepare(
        model, observer, torch.float32, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(h._control_net.parameters(), ctl.parameters()))
    assert h.resolved() == {"perturb": 0.5, "control": str(tmp_path / "ctl")}  # a run's summary says so
    with pytest.raises(ValidationError, match="needs N >= 2"):
        Learned(checkpoint=str(tmp_path / "ens"), N=1, control=str(tmp_path / "ctl"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Learned(checkpoint=str(tmp_path / "ens"), N=6, perturb=0.5, control=str(tmp_path / "nothing")).prepare(
            model, observer, torch.float32, "cpu")
    # a KS network as the control of a Lorenz 96 ensemble: refused by its dynamics (the shipped one, averaged over
    # the reflection, by the symmetry Lorenz 96 lacks; stage 5, which is not, by the name of its model)
    with pytest.raises(CheckpointError, match="the model Lorenz96 is not symmetric"):
        Learned(checkpoint=str(NE10), N=10, perturb=0.5, control=str(ROOT / "weights" / "ks_ne1")).prepare(
            model, observer, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="trained on the model ks"):
        Learned(checkpoint=str(NE10), N=10, perturb=0.5, control=str(ROOT / "weights" / "ks_ne1" / "stage5")).prepare(
            model, observer, torch.float32, "cpu")
    # the shipped ensemble's calibrated perturbation is that of the ensemble without a control: not taken silently
    with pytest.raises(CheckpointError, match="give filter.perturb"):
        prepared(NE10, 10, control=str(tmp_path / "ctl"))
    with pytest.raises(ConfigError, match="calibrate --write"):
        calibrate(NE10, [0.5], cycles=20, burn_in=5, batch=1, overrides=[f"filter.control={tmp_path / 'ctl'}"],
                  write=True)
