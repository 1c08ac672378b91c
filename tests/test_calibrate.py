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
