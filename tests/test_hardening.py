"""One test per defect of the hardening audit (issue 14), so that none comes back: nothing lost or half-written,
a filter blow-up flagged as divergence (never a crash of the batch), non-physical values refused, every bad
input one line and exit 2, memory bounded before the run starts, and the friction items."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from danlab import cli
from danlab.config import ConfigError, load_config, parse_value, read_yaml
from danlab.cycle import run_cycles
from danlab.experiments import runner
from danlab.experiments.run_config import RunConfig
from danlab.experiments.runner import format_score, parse_grid, run_experiment
from danlab.filters.base import safe_eigh
from danlab.filters.ensemble import EnKF, EnKF_N, ETKF
from danlab.filters.iterative import IEnKF
from danlab.io import OutputError, check_output_dir
from danlab.learned import load_net, save_net
from danlab.models import Lorenz96
from danlab.nets import NetConfig, build_net
from danlab.observations import Observer
from danlab.resources import check_run_memory, run_memory_terms
from danlab.checkpoint import CheckpointError
from danlab.training.train_config import TrainRunConfig
from danlab.experiments.export import export
from danlab.twin import TwinStream

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "l96_simplified_ne1"
TINY_RUN = ["--set", "cycles=30", "--set", "burn_in=5", "--set", "threads=1"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """danlab in this process: (exit code, stdout, stderr); argparse's exits count as exit codes."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("danlab: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a twin experiment or a training starts: the refusal must come before any computation."""
    def boom(*a, **k):
        raise AssertionError("the computation started before the bad output location was refused")
    monkeypatch.setattr(runner, "simulate", boom)
    import danlab.training.trainer as trainer
    monkeypatch.setattr(trainer, "train", boom)


# ---------------------------------------------------------------- data loss

def test_export_onto_its_own_source_deletes_nothing(tmp_path):
    w = tmp_path / "w"
    shutil.copytree(SHIPPED, w)
    before = digest(w)
    with pytest.raises(CheckpointError, match="export into another folder"):
        export(w, w, cycles=40, burn_in=5, batch=1)
    with pytest.raises(CheckpointError, match="export into another folder"):
        export(w, tmp_path / "." / "w", cycles=40, burn_in=5, batch=1)  # the same folder spelt differently
    assert digest(w) == before
    load_net(w)


def test_export_never_half_writes(tmp_path, monkeypatch):
    w = tmp_path / "w"
    shutil.copytree(SHIPPED, w)
    with pytest.raises(ConfigError, match="cycles"):  # refused before anything is written
        export(w, tmp_path / "o" / "x", cycles=0)
    assert not (tmp_path / "o").exists()
    # a failure in the middle of the evaluation: a previous export in dest is left exactly as it was
    dest = tmp_path / "dest"
    export(w, dest, cycles=40, burn_in=5, batch=1)
    (dest / "mine.txt").write_text("not the exporter's")
    before = digest(dest)

    def fails(*a, **k):
        raise RuntimeError("killed mid-evaluation")
    monkeypatch.setattr("danlab.experiments.export.run_experiment", fails)
    with pytest.raises(RuntimeError, match="killed"):
        export(w, dest, cycles=40, burn_in=5, batch=1)
    with pytest.raises(RuntimeError, match="killed"):
        export(w, tmp_path / "fresh", cycles=40, burn_in=5, batch=1)
    with pytest.raises(RuntimeError, match="killed"):
        export(w, tmp_path / "new" / "deeper" / "x", cycles=40, burn_in=5, batch=1)
    assert digest(dest) == before and not (tmp_path / "fresh").exists() and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "w"]  # no temporary folder left behind


def test_export_into_an_existing_folder_keeps_its_other_files(tmp_path):
    w = tmp_path / "w"
    shutil.copytree(SHIPPED, w)
    dest = tmp_path / "dest"
    (dest / "run").mkdir(parents=True)
    (dest / "run" / "checkpoint.json").write_text("{}")
    (dest / "model-000000000000.safetensors").write_bytes(b"an older export's tensors")
    prov = export(w, dest, cycles=40, burn_in=5, batch=1)
    assert (dest / "run" / "checkpoint.json").read_text() == "{}"
    assert not (dest / "model-000000000000.safetensors").exists()  # superseded by the new sidecar's file
    net, meta = load_net(dest)
    assert json.loads((dest / "provenance.json").read_text())["evaluation"]["armse"] == prov["evaluation"]["armse"]


@pytest.mark.parametrize("argv", [
    ["run", "configs/l96/etkf.yaml", *TINY_RUN],
    ["tune", "configs/l96/etkf.yaml", "--grid", "infl=1.0:1.1:0.05", *TINY_RUN],
    ["eval", SHIPPED, "--cycles", "30", "--burn-in", "5"],
    ["train", "configs/l96/dan_nf40.yaml"],
    ["sweep", "configs/sweeps/example_tiny.yaml", "--scheduler", "synchronous"],
    ["reproduce", "table", "--quick"],
])
@pytest.mark.parametrize("where", ["/proc/x", "a file"])
def test_bad_out_is_refused_before_any_computation(argv, where, tmp_path, capsys, monkeypatch, no_compute):
    monkeypatch.chdir(ROOT)
    if where == "a file":
        where = tmp_path / "afile"
        where.write_text("")
    rc, _, err = run_cli(capsys, *argv, "--out", where)
    assert_one_line_error(rc, err, str(where))


def test_export_to_a_bad_destination_is_refused_first(tmp_path, capsys, no_compute):
    (tmp_path / "afile").write_text("")
    for dest in ("/proc/x", tmp_path / "afile"):
        rc, _, err = run_cli(capsys, "export", SHIPPED, dest, "--cycles", "40")
        assert_one_line_error(rc, err, "export destination")


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # the probe leaves nothing
    for bad in ("/proc/x", "/sys/y", "/dev/z"):
        with pytest.raises(OutputError, match="system folder"):
            check_output_dir(bad)
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "f" / "under")


# ---------------------------------------------------------------- non-physical values, blow-ups

@pytest.mark.parametrize("override, field", [
    ("model.F=.inf", "model.F"), ("model.F=.nan", "model.F"), ("model.F=inf", "model.F"),
    ("init_std=.inf", "init_std"), ("divergence_factor=.inf", "divergence_factor"),
    ("divergence_factor=.nan", "divergence_factor"), ("filter.infl=.inf", "filter.infl"),
    ("observations.sigma=.inf", "observations.sigma"), ("model.dt=.nan", "model.dt"),
])
def test_non_finite_values_are_refused(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(RunConfig, ROOT / "configs/l96/etkf.yaml", [override])


def test_non_finite_values_refused_in_every_section():
    for over in ("train.lr=.inf", "train.clip=.nan", "net.gain0=.inf", "net.scale=.inf", "model.F=.inf"):
        with pytest.raises(ConfigError, match=over.split("=")[0].replace(".", r"\.")):
            load_config(TrainRunConfig, None, [over])


@pytest.mark.parametrize("override", ["model.dt=1e10", "model.dt=10.0", "model.F=30"])
def test_an_unstable_truth_is_refused(override):
    cfg = load_config(RunConfig, ROOT / "configs/l96/enkf_n.yaml", [override, "cycles=50", "burn_in=5"])
    with pytest.raises(ConfigError, match="model.dt"):
        run_experiment(cfg, None)


class BlowUp:
    """A model whose `at`-th call multiplies row `row` of its output by 1e200: an ensemble blown up to huge but
    finite values, whose S S^T overflows (before the fix: LinAlgError in eigh, the whole batch lost)."""

    def __init__(self, model, row: int, at: int):
        self.model, self.row, self.at, self.calls, self.Nx = model, row, at, 0, model.Nx

    def __call__(self, x):
        y = self.model(x)
        self.calls += 1
        if self.calls == self.at and x.dim() == 3:
            y = y.clone()
            y[self.row] = y[self.row] * 1e200
        return y


BLOWUP_FILTERS = {"enkf": EnKF(N=20, infl=1.05), "etkf": ETKF(N=20, infl=1.02), "enkf_n": EnKF_N(N=20, xN=2.0),
                  "enkf_n_hess": EnKF_N(N=20, hess=True, xN=2.0), "ienkf": IEnKF(N=20, infl=1.015),
                  "ienkf_n": IEnKF(N=20, prior="N", xN=2.0)}


@pytest.mark.parametrize("name", BLOWUP_FILTERS)
def test_a_blow_up_inside_a_filter_is_flagged_not_a_crash(name):
    filt, L96, ids = BLOWUP_FILTERS[name], Lorenz96(), [0, 1, 2]

    def go(model):
        twin = TwinStream(L96, Observer(40), 3, seed=3, ids=ids, spinup_time=5.0)
        return run_cycles(filt, model, twin, 40, 10, 3, ids=ids)
    ref, bad = go(L96), go(BlowUp(L96, row=1, at=20))
    assert bad.diverged.tolist() == [False, True, False] and 0 <= bad.diverged_at[1] <= 20
    for b in (0, 2):  # the healthy rows are computed exactly as without the blow-up (the IEnKF's too, since its
        # Gauss-Newton loop runs in NumPy, whose stacked products work matrix by matrix)
        assert np.array_equal(bad.rmse_a[b], ref.rmse_a[b]) and np.array_equal(bad.spread_a[b], ref.spread_a[b])
    assert np.isfinite(bad.scores()["armse"])


def test_safe_eigh_flags_only_the_bad_rows():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    G = A @ A.mT
    lam0, V0 = torch.linalg.eigh(G)
    G[1, 0, 0] = torch.nan
    G[3] = G[3] * 1e300 * 1e10  # overflows to inf
    lam, V, ok = safe_eigh(G)
    assert ok.tolist() == [True, False, True, False]
    assert torch.equal(lam[[0, 2]], lam0[[0, 2]]) and torch.equal(V[[0, 2]], V0[[0, 2]])


def test_enkf_n_run_of_the_issue_does_not_crash(capsys):
    """The reproduction of the issue: model.F=30 now stops at once, one line naming model.dt: its truth itself
    is not finite (RK4 at dt 0.05 is unstable for F = 30), which is a config error, not a filter divergence."""
    rc, _, err = run_cli(capsys, "run", ROOT / "configs/l96/enkf_n.yaml", "--set", "model.F=30", "--set", "cycles=1000",
                         "--set", "burn_in=100", "--set", "batch=4", "--set", "threads=1")
    assert_one_line_error(rc, err, "model.dt")


def test_an_unstable_truth_is_one_line_from_the_shell(tmp_path):
    """In a process of its own (no pytest capturing warnings): the NumPy integration of a blown-up truth prints no
    RuntimeWarning before the one-line error."""
    r = subprocess.run([sys.executable, "-m", "danlab.cli", "run", str(ROOT / "configs/l96/enkf_n.yaml"), "--set",
                        "model.F=30", "--set", "cycles=100", "--set", "burn_in=10", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(r.returncode, r.stderr, "model.dt")


def test_every_experiment_diverged_is_said_so(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "run", ROOT / "configs/l96/etkf.yaml", "--set", "init_std=1e5", "--set", "batch=2",
                           *TINY_RUN, "--out", tmp_path / "r", "--quiet")
    assert rc == 0, err
    assert "diverged (2 of 2)" in out and "nan" not in out
    assert (tmp_path / "r" / "rmse.png").is_file()


# ---------------------------------------------------------------- tracebacks on input

def test_non_utf8_and_folder_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"cycles: 10\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        read_yaml(tmp_path)


@pytest.mark.parametrize("argv, needle", [
    (["run", "BAD"], "not a UTF-8"),
    (["train", "BAD"], "not a UTF-8"),
    (["sweep", "BAD"], "not a UTF-8"),
    (["run", "configs/l96/etkf.yaml", "--set", "filter.N=["], "--set filter.N=["),
    (["tune", "configs/l96/etkf.yaml", "--grid", "infl=nan:1:0.1"], "finite"),
    (["tune", "configs/l96/etkf.yaml", "--grid", "infl=1:inf:0.1"], "finite"),
    (["tune", "configs/l96/etkf.yaml", "--grid", "infl=[,1"], "--grid"),
    (["run", "configs/l96/etkf.yaml", "--set", "device=cuda"] if not torch.cuda.is_available() else
     ["run", "configs/l96/etkf.yaml", "--set", "device=cuda:99"], "device"),
    (["run", "configs/l96/etkf.yaml", "--set", "device=banana"], "device"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.device=banana"], "train.device"),
    (["run", "configs/l96/etkf.yaml", "--set", "cycles=1e11"], "cycles"),
    (["run", "configs/l96/etkf.yaml", "--set", "cycles=100000000000"], "cycles"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "net.kernel=101"], "net.kernel"),
    (["sweep", "configs/sweeps/example_tiny.yaml", "--scheduler", "banana"], "--scheduler banana"),
    (["sweep", "configs/sweeps/example_tiny.yaml", "--only", "filter.N=15"], "--only filter.N=15: not a value"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.lr=inf"], "train.lr"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.train_only=[]"], "train.train_only"),
    (["train", "configs/l96/dan_fast.yaml", "--set", "train.train_only=[gates.]"], "'gates.' names no parameter"),
    (["train", "configs/l96/dan_nf40.yaml", "--stop-after", "-1"], "--stop-after"),
    (["eval", SHIPPED, "--nx", "0"], "model.Nx"),
    (["eval", SHIPPED, "--N", "0"], "filter.N"),
    (["eval", SHIPPED, "--burn-in", "-1"], "--burn-in"),
    (["run", "configs/l96/etkf.yaml", "--set", "filter.N=10000000"], "filter.N"),
    (["run", "configs/l96/etkf.yaml", "--set", "model.Nx=100000000"], "model.Nx"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "model.Nx=100000000"], "model.Nx"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.Nt=100000000"], "train.Nt"),
    (["run", "configs/l96"], "is a folder"),
    (["train", "--resume", "configs"], "not a training run folder"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "net.kernel=4"], "net.kernel"),
    (["run"], "config"),
    (["nonsense"], "invalid choice"),
    (["run", "configs/l96/etkf.yaml", "--set", "model.steps=4"], "`steps` was renamed `substeps`"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.steps=4"], "`steps` was renamed `max_steps`"),
    (["train", "configs/l96/dan_nf40.yaml", "--set", "train.Ne=4"], "`Ne` was renamed `N`"),
    (["run", "configs/l96/etkf.yaml", "--set", "model.name=banana"], "model.name: unknown 'banana'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys, monkeypatch, no_compute):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\n\xff\xfe\n")
    argv = [bad if a == "BAD" else a for a in argv]
    rc, _, err = run_cli(capsys, *argv, *(["--out", tmp_path / "out"] if argv[0] in ("run", "tune", "train", "sweep")
                                          and "--resume" not in argv and len(argv) > 1 else []))
    assert_one_line_error(rc, err, needle)
    assert "(got 4) (got 4)" not in err


def test_parse_value_and_grid_errors_name_the_input():
    with pytest.raises(ConfigError, match="filter.N=\\["):
        load_config(RunConfig, None, ["filter.N=["])
    with pytest.raises(ConfigError, match="x: not a valid value"):
        parse_value("[", "x")
    for spec in ("infl=nan:1:0.1", "infl=1:inf:0.1", "infl=0:1:nan", "infl=-inf:0:1"):
        with pytest.raises(ConfigError, match="finite"):
            parse_grid(spec)


def test_a_sweep_with_a_malformed_tune_grid(tmp_path):
    from danlab.experiments.sweep import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text(f"name: s\nkind: tune\nbase: {ROOT / 'configs/l96/etkf.yaml'}\ngrid: {{seed: [0, 1]}}\n"
                 "tune: ['infl=nan:1:0.1']\n")
    with pytest.raises(ConfigError, match="finite"):
        load_sweep(f)


def test_a_dead_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    import danlab.experiments.sweep as sweep
    monkeypatch.setattr(sweep, "SCHEDULER_TIMEOUT_S", 1)
    rc, out, err = run_cli(capsys, "sweep", ROOT / "configs/sweeps/example_tiny.yaml", "--scheduler",
                           "tcp://127.0.0.1:9", "--out", tmp_path)
    assert_one_line_error(rc, err, "cannot reach the scheduler")


def test_sidecar_problems_name_the_field(tmp_path):
    net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1))
    save_net(tmp_path / "a", net, {"trained_with": [1, 2]})
    with pytest.raises(CheckpointError, match="trained_with must be a mapping"):
        load_net(tmp_path / "a")
    save_net(tmp_path / "b", net, {"trained_with": {"model": "x"}})
    with pytest.raises(CheckpointError, match="trained_with.model must be a mapping"):
        load_net(tmp_path / "b")
    side = json.loads((tmp_path / "b" / "model.json").read_text())
    side["trained_with"] = {}
    side["net"]["kernel"] = 4
    (tmp_path / "b" / "model.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match=r"net\.kernel: must be odd \(got 4\)$"):
        load_net(tmp_path / "b")


def test_a_kernel_wider_than_the_state_is_refused_at_eval(tmp_path):
    save_net(tmp_path / "w", build_net(NetConfig(Nf=4, Nbl=1, Nl=1, kernel=11)),
             {"trained_with": TrainRunConfig().model_dump(mode="json")})
    cfg = load_config(RunConfig, data={"cycles": 20, "burn_in": 2, "model": {"Nx": 4},
                                       "filter": {"method": "learned", "checkpoint": str(tmp_path / "w")}})
    with pytest.raises((CheckpointError, ConfigError), match="net.kernel"):  # either way: one line, exit 2
        run_experiment(cfg, None)


# ---------------------------------------------------------------- unbounded memory

def test_memory_estimate_names_the_knob():
    base = load_config(RunConfig, ROOT / "configs/l96/enkf_n.yaml")
    assert check_run_memory(base) < 64 * 1024**2  # the reference run: a few MiB
    cases = {"filter.N=10000000": "filter.N", "model.Nx=100000000": "model.Nx", "cycles=100000000000": "cycles",
             "batch=100000000": "batch"}
    for over, knob in cases.items():
        cfg = load_config(RunConfig, ROOT / "configs/l96/enkf_n.yaml", [over])
        with pytest.raises(ConfigError, match=f"^{knob}: this run would need .* lower {knob}"):
            check_run_memory(cfg, available=16 * 1024**3)
    from danlab.resources import check_train_memory
    assert check_train_memory(load_config(TrainRunConfig, ROOT / "configs/l96/dan_nf40.yaml")) < 2 * 1024**3
    with pytest.raises(ConfigError, match="^net.Nf: this training would need"):
        check_train_memory(load_config(TrainRunConfig, ROOT / "configs/l96/dan_nf40.yaml", ["net.Nf=100000"]))
    with pytest.raises(ConfigError, match="^train.distill_cycles: this training would need .* the stored distillation set"):
        check_train_memory(load_config(TrainRunConfig, ROOT / "configs/l96/dan_nf40.yaml", ["train.distill_cycles=10000000"]))
    terms = run_memory_terms(load_config(RunConfig, ROOT / "configs/l96/var3d.yaml", ["model.Nx=4000"]))
    assert "model.Nx" in terms[0][2]


# ---------------------------------------------------------------- friction

def test_config_show_lists_every_key(capsys):
    rc, out, _ = run_cli(capsys, "config", "show")
    assert rc == 0
    for key in ("cycles", "divergence_factor", "model.F", "observations.fraction", "filter.xN", "filter.scale",
                "train.lr", "net.kernel", "train.ema"):
        assert f"\n{key} " in out, key
    assert "std of the initial ensemble around the truth" in out and "int (>= 2)" in out
    rc, out, _ = run_cli(capsys, "config", "show", ROOT / "configs/l96/enkf_n.yaml", "--set", "filter.N=40")
    line = next(ln for ln in out.splitlines() if ln.startswith("filter.N "))
    assert line.split()[4:6] == ["20", "40"] and "filter.scale" not in out  # default, value; only the filter in use
    rc, _, err = run_cli(capsys, "config", "show", ROOT / "configs/l96/enkf_n.yaml", "--set", "filter.N=0")
    assert_one_line_error(rc, err, "filter.N")


def test_progress_bar_by_default_on_a_terminal_only(monkeypatch):
    class A:
        quiet, progress = False, False
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert cli._progress(A())
    A.quiet = True
    assert not cli._progress(A())
    A.quiet = False
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert not cli._progress(A())
    A.progress = True
    assert cli._progress(A())


def test_scores_for_people():
    assert format_score({"armse": 0.19, "armse_ci": 0.002}) == "0.1900 ± 0.0020"
    assert format_score({"armse": float("nan"), "armse_ci": float("nan"), "n_diverged": 3, "experiments": 4,
                         "diverged": True}) == "diverged (3 of 4)"
    from danlab.experiments.reproduce import _cell
    assert _cell({"armse": float("nan"), "armse_ci": float("nan"), "note": "no weights"}) == "no weights"
    # a table's cell says when some experiments were lost: the score is then that of the others only
    assert _cell({"armse": 0.4448, "armse_ci": 0.0021, "diverged": 1, "experiments": 4}, 3) == "0.445 ± 0.002 (1 of 4 diverged)"
    assert _cell({"armse": 0.4448, "armse_ci": 0.0021, "diverged": 0, "experiments": 4}, 3) == "0.445 ± 0.002"


def test_rmse_plot_labels_and_counts(tmp_path, monkeypatch):
    import matplotlib.axes
    seen = {}
    orig_title, orig_ylabel = matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **k: seen.update(title=t) or orig_title(self, t, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, t, **k: seen.update(ylabel=t) or orig_ylabel(self, t, **k))

    class RowTwoRunsAway(ETKF):
        def analysis(self, E, obs, rng):
            E = super().analysis(E, obs, rng)
            return torch.where(torch.arange(E.shape[0]).view(-1, 1, 1) == 2, E + 40.0, E)

    cfg = load_config(RunConfig, data={"cycles": 40, "burn_in": 5, "batch": 3, "filter": {"method": "etkf"}})
    monkeypatch.setattr(type(cfg.filter), "prepare", lambda self, *a: RowTwoRunsAway(N=20, infl=1.02))
    run_experiment(cfg, tmp_path)
    assert "RMSE" in seen["ylabel"]
    assert "2 of 3 experiments scored, 1 diverged" in seen["title"]


# ---------------------------------------------------------------- threads under contention

def test_default_threads_by_problem_size(monkeypatch):
    from danlab import resources
    monkeypatch.setattr(resources, "cores", lambda: 16)
    small = load_config(RunConfig, ROOT / "configs/l96/enkf_n.yaml", ["batch=64", "filter.N=40"])
    assert resources.default_threads(small) == 1
    assert resources.default_threads(small, rows=1000) == 16  # a big tuning grid: 64 000 experiments × 40 × 40
    big = load_config(RunConfig, ROOT / "configs/l96/enkf_n.yaml", ["model.Nx=8000"])
    assert resources.default_threads(big) == 16
    cfg = load_config(RunConfig, ROOT / "configs/l96/etkf.yaml", ["cycles=20", "burn_in=2"])
    torch.set_num_threads(2)
    assert run_experiment(cfg, None)["threads"] == 1
    assert run_experiment(cfg.model_copy(update={"threads": 2}), None)["threads"] == 2


def test_sweep_workers_times_threads_within_the_cores(monkeypatch, tmp_path, capsys):
    import danlab.experiments.sweep as sweep
    from danlab import resources
    seen = {}

    class Stop(Exception):
        pass

    def expand(s, root, threads):
        seen["threads"] = threads
        raise Stop
    monkeypatch.setattr(resources, "cores", lambda: 4)
    monkeypatch.setattr(sweep, "_expand", expand)
    for workers, threads, expected in ((2, 4, 2), (4, 1, 1), (8, 2, 1), (1, 3, 3)):
        with pytest.raises(Stop):
            sweep.run_sweep(ROOT / "configs/sweeps/example_tiny.yaml", out=tmp_path, workers=workers, threads=threads)
        assert seen["threads"] == expected, (workers, threads)
    with pytest.raises(Stop):  # an existing cluster is not ours to pin
        sweep.run_sweep(ROOT / "configs/sweeps/example_tiny.yaml", out=tmp_path, scheduler="synchronous", workers=2, threads=4)
    assert seen["threads"] == 4


def test_the_shipped_weights_still_score_about_0_20():
    """weights/l96_nf40_ne1 as a filter over a short held-out run (4 experiments × 600 scored cycles, seed 3):
    0.2007 ± 0.007 measured, 0.1994 ± 0.0013 over the reference 8 × 10,000. A change to the network code, the
    model, the observations or the evaluation path that loses accuracy shows here."""
    from danlab.experiments.run_config import learned_eval_data
    w = ROOT / "weights" / "l96_nf40_ne1"
    _, meta = load_net(w)
    data = learned_eval_data(meta["trained_with"], w, seed=3, cycles=700, burn_in=100, batch=4)
    s = run_experiment(load_config(RunConfig, data=data | {"threads": 1}), None)
    assert s["n_diverged"] == 0 and 0.185 <= s["armse"] <= 0.215, s["armse"]


# ---------------------------------------------------------------- science-changing resume

TINY_TRAIN = ("net: {Nf: 4, Nbl: 1, Nl: 1}\ntrain: {Nt: 4, N_iter: 2, max_steps: 2, warmup: 1, val_every: 2, "
              "val_cycles: 20, val_burn_in: 5, val_batch: 1, threads: 1}\n")


def test_resume_refuses_a_change_of_physics_named_like_a_schedule_knob(tmp_path, capsys):
    """`model.substeps` (the RK4 substeps: physics) and `train.max_steps` (the schedule) are compared by dotted
    path: the first is refused on resume, the second is a recorded schedule change."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TINY_TRAIN)
    rc, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--set", "model.substeps=4", "--quiet")
    assert_one_line_error(rc, err, "model.substeps")
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--set", "train.max_steps=3", "--quiet")
    assert rc == 0, err
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["schedule_history"] == [{"step": 2, "set": {"max_steps": 3}}]


def test_a_run_folder_written_with_the_old_key_names_still_resumes(tmp_path, capsys):
    """Run folders and sidecars written before the renames (model.steps, train.steps, train.Ne) are upgraded on
    reading; only configs written now by a user are refused."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TINY_TRAIN)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", run, "--quiet")[0] == 0
    old = {"substeps": "steps", "max_steps": "steps", "N": "Ne"}
    y = yaml.safe_load((run / "config.yaml").read_text())
    y["model"]["steps"] = y["model"].pop("substeps")
    y["train"]["steps"] = y["train"].pop("max_steps")
    y["train"]["Ne"] = y["train"].pop("N")
    (run / "config.yaml").write_text(yaml.safe_dump(y))
    for name in ("checkpoint.json", "best/model.json"):
        meta = json.loads((run / name).read_text())
        c = meta["config"] if "config" in meta else meta["trained_with"]
        for sec, new in (("model", "substeps"), ("train", "max_steps"), ("train", "N")):
            c[sec][old[new]] = c[sec].pop(new)
        (run / name).write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "train", "--resume", run, "--set", "train.max_steps=3", "--quiet")
    assert rc == 0, err
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 3
    rc, out, err = run_cli(capsys, "eval", run, "--cycles", "20", "--burn-in", "5", "--json", "--out", tmp_path / "e")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["armse"] > 0, err


def test_sigterm_checkpoints_the_step_reached_and_the_run_resumes(tmp_path):
    """A SIGTERM (a scheduler's preemption) or Ctrl-C stops training after the current step with a checkpoint:
    nothing trained is lost, and --resume continues from exactly there."""
    import signal
    import subprocess
    import sys
    import time
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TINY_TRAIN.replace("max_steps: 2", "max_steps: 100000").replace("val_every: 2", "val_every: 100000")
                   .replace("threads: 1", "threads: 1, log_every: 1"))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "danlab.cli", "train", str(cfg), "--out", str(run), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.csv").is_file()
                                          and len((run / "metrics.csv").read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    meta = json.loads((run / "checkpoint.json").read_text())
    assert result["stopped_by"] == "SIGTERM" and meta["step"] == result["step"] >= 3
    rows = (run / "metrics.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[0]) == meta["step"]  # logged every step here: the last row is the checkpoint's


def test_reproduce_outside_a_checkout_is_one_line(tmp_path, capsys, monkeypatch):
    """The reference configs are read from the repository root the command runs in, never found through the
    package's install path: elsewhere, one line saying where to run it."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "reproduce", "table", "--quick", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "run it from the danlab repository root")
    assert not (tmp_path / "r").exists()


def test_a_filter_without_an_analysis_says_so():
    """Filter.analysis is the base's (a mutant run found it dead, indented after a return in another function)."""
    from danlab.filters.base import Filter
    from danlab.models import Lorenz96

    class NoAnalysis(Filter):
        pass

    with pytest.raises(NotImplementedError, match="NoAnalysis does not implement an analysis"):
        NoAnalysis(N=2).cycle(torch.zeros(1, 2, 8, dtype=torch.float64), Lorenz96(Nx=8), None, None)


@pytest.mark.parametrize("what", ["table", "nonlinearity"])
def test_reproduce_refuses_weights_it_would_ignore(tmp_path, capsys, what):
    """table and nonlinearity evaluate the shipped networks of their rows: a --weights would be silently ignored."""
    rc, _, err = run_cli(capsys, "reproduce", what, "--quick", "--weights", "l96_nf40_ne1", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, f"reproduce {what}: --weights is not used")
    assert not (tmp_path / "r").exists()


def test_reproduce_nonlinearity_with_a_corrupt_partial_file_is_one_line(tmp_path, capsys):
    """The study resumes from out/partial.json: a damaged one is named, not a traceback, and left in place."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "partial.json").write_bytes(b'{"budget": {"cycles": 1')
    rc, _, err = run_cli(capsys, "reproduce", "nonlinearity", "--quick", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "partial.json: not a study's rows")
    assert (tmp_path / "r" / "partial.json").read_bytes() == b'{"budget": {"cycles": 1'
