import json
import subprocess
import sys
from pathlib import Path

import pytest

from danlab.learned import save_net
from danlab.nets import NetConfig, build_net
from danlab.training.train_config import TrainRunConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def danlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "danlab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)


def test_run_json_and_overrides(tmp_path):
    r = danlab("run", "configs/l96/etkf.yaml", "--set", "cycles=200", "--set", "burn_in=50", "--set", "filter.N=30",
               "--set", "threads=1", "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("method", "armse", "armse_ci", "spread", "cycles", "cycles_per_s", "diverged"):
        assert key in s
    assert s["method"] == "etkf" and s["cycles"] == 200 and s["N"] == 30 and not s["diverged"]
    assert 0.1 < s["armse"] < 0.3
    for f in ("config.yaml", "stats.nc", "summary.json", "rmse.png"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.parametrize("override, field", [
    ("filter.N=0", "filter.N"), ("model.Nx=-3", "model.Nx"), ("observations.sigma=0", "observations.sigma"),
    ("observations.sigma=-1", "observations.sigma"), ("nonsense=1", "nonsense: unknown key"),
    ("filter.infl=abc", "filter.infl"), ("burn_in=20000", "burn_in"), ("filter.method=nope", "filter"),
])
def test_bad_config_exits_2_with_one_line(override, field):
    r = danlab("run", "configs/l96/etkf.yaml", "--set", override)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("danlab: error: ") and field in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_ensemble_method_needs_two_members_and_missing_file():
    r = danlab("run", "configs/l96/enkf_n.yaml", "--set", "filter.N=1")
    assert r.returncode == 2 and "N must be >= 2" in r.stderr
    r = danlab("run", "configs/l96/nothere.yaml")
    assert r.returncode == 2 and "no such config file" in r.stderr


def test_tune_cli(tmp_path):
    r = danlab("tune", "configs/l96/var3d.yaml", "--grid", "scale=0.01:0.03:0.01", "--set", "cycles=300",
               "--set", "burn_in=50", "--set", "threads=1", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["points"] == 3 and s["best"]["filter.scale"] in (0.01, 0.02, 0.03)
    assert (tmp_path / "tune.csv").is_file() and (tmp_path / "tune.png").is_file()


def test_eval_and_export_of_a_network(tmp_path):
    net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1))
    save_net(tmp_path / "w", net, {"trained_with": TrainRunConfig().model_dump(mode="json")})
    r = danlab("eval", str(tmp_path / "w"), "--cycles", "200", "--burn-in", "50", "--batch", "2", "--nx", "80",
               "--out", str(tmp_path / "ev"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["method"] == "learned" and s["Nx"] == 80 and s["N"] == 1
    assert 0.2 < s["armse"] < 0.6  # an untrained a_theta is a nudging with gain 0.3
    (tmp_path / "w" / "model.json").write_text("{")
    r = danlab("eval", str(tmp_path / "w"))
    assert r.returncode == 2 and "corrupt sidecar" in r.stderr and "Traceback" not in r.stderr


def test_train_and_resume_cli(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("net: {Nf: 4, Nbl: 1, Nl: 1}\ntrain: {Nt: 8, N_iter: 2, max_steps: 4, warmup: 1, val_every: 2, "
                   "val_cycles: 30, val_burn_in: 5, val_batch: 2, threads: 1}\n")
    r = danlab("train", str(cfg), "--out", str(tmp_path / "run"), "--stop-after", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2
    r = danlab("train", "--resume", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
    r = danlab("train", "--resume", str(tmp_path / "run"), "--set", "train.N_iter=3", "--quiet")
    assert r.returncode == 2 and "train.N_iter" in r.stderr
    # a warm restart: more steps with a new learning rate, recorded in the schedule history
    r = danlab("train", "--resume", str(tmp_path / "run"), "--set", "train.max_steps=6", "--set", "train.lr=0.002", "--quiet")
    assert r.returncode == 0, r.stderr
    history = [{"step": 4, "set": {"lr": 0.002, "max_steps": 6}}]
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["schedule_history"] == history
    r = danlab("export", str(tmp_path / "run"), str(tmp_path / "w"), "--cycles", "100", "--burn-in", "20", "--batch", "2")
    assert r.returncode == 0, r.stderr
    prov = json.loads((tmp_path / "w" / "provenance.json").read_text())
    assert prov["step"] in (2, 4, 6) and "danlab eval" in prov["evaluation"]["command"]
    assert prov["schedule_history"] == (history if prov["step"] == 6 else [])
    assert ("resumed at step 4" in (tmp_path / "w" / "README.md").read_text()) == (prov["step"] == 6)
    assert "trained on the model lorenz96 (Nx 40, F 8.0, dt 0.05, substeps 1, Δt 0.05," in (tmp_path / "w" / "README.md").read_text()
    for f in ("model.json", "curve.png", "metrics.csv", "README.md"):
        assert (tmp_path / "w" / f).is_file()
