import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from danlab.config import ConfigError
from danlab.experiments import runner
from danlab.experiments.sweep import Sweep, load_sweep, point_id, run_sweep
from danlab.training import trainer

ETKF = {"cycles": 60, "burn_in": 10, "filter": {"method": "etkf", "N": 10, "infl": 1.02}}
TINY = {"net": {"Nf": 8, "Nbl": 1, "Nl": 2}, "train": {"Nt": 16, "N_iter": 3, "max_steps": 8, "warmup": 2, "lr": 3e-3,
        "val_every": 2, "val_cycles": 40, "val_burn_in": 10, "val_batch": 2, "log_every": 1}}


def write_sweep(tmp_path, **fields) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def point_dirs(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and "=" in p.name)


def test_local_cluster_workers_keep_the_default_allocator(monkeypatch):
    """Our LocalCluster's workers do not get Dask's MALLOC_TRIM_THRESHOLD_ (it switches off glibc's adaptive mmap
    threshold: a training step ran 3.2x slower, benchmarks/sweep_worker_env.py); the thread pins stay."""
    import os

    from danlab.experiments.sweep import _client
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    client, close = _client(None, 1)
    try:
        env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
                        .values()))
    finally:
        close()
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}


def test_local_cluster_sweep_then_idempotent_rerun(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "etkf.yaml").write_text(yaml.safe_dump(ETKF))
    path = write_sweep(tmp_path, name="tiny", kind="run", base="base/etkf.yaml", set=["cycles=80"],
                       grid={"filter.N": [10, 20], "filter.infl": [1.02, 1.05]})
    out = tmp_path / "out"
    r = run_sweep(path, out=out, workers=2, progress=False)  # a real LocalCluster
    assert (r["points"], r["done"], r["skipped"], r["failed"]) == (4, 4, 0, [])
    root = out / "tiny"
    ds = r["dataset"]
    assert list(ds["filter.N"].values) == [10, 20] and list(ds["filter.infl"].values) == [1.02, 1.05]
    assert ds["armse"].dims == ("filter.N", "filter.infl") and (ds["status"] == 0).all()
    for N in (10, 20):
        for infl in (1.02, 1.05):
            pdir = root / f"filter.N={N},filter.infl={infl}"
            done = json.loads((pdir / "done.json").read_text())
            assert done["N"] == N and done["cycles"] == 80  # the grid point and `set` reached the config
            assert yaml.safe_load((pdir / "config.yaml").read_text())["filter"]["infl"] == infl
            at = ds.sel({"filter.N": N, "filter.infl": infl})
            for k in ("armse", "armse_ci", "spread", "cycles_per_s", "n_diverged"):
                assert float(at[k]) == pytest.approx(done[k], rel=1e-12), k
    on_disk = xr.load_dataset(r["results"])
    xr.testing.assert_allclose(on_disk[["armse", "armse_ci"]], ds[["armse", "armse_ci"]])
    assert len(pd.read_csv(root / "results.csv")) == 4 and (root / "results.png").stat().st_size > 0
    assert yaml.safe_load((root / "sweep.yaml").read_text())["config"]["cycles"] == 60  # base inline

    mtimes = {p: (p.stat().st_mtime_ns, (p / "done.json").stat().st_mtime_ns) for p in point_dirs(root)}
    again = run_sweep(path, out=out, workers=2, progress=False)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 4, [])
    xr.testing.assert_identical(again["dataset"], ds)
    assert {p: (p.stat().st_mtime_ns, (p / "done.json").stat().st_mtime_ns) for p in point_dirs(root)} == mtimes


def test_failed_points_are_reported_and_retried(tmp_path, monkeypatch):
    s = Sweep(name="f", kind="run", config=ETKF, grid={"filter.N": [1, 10, 20]})
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)
    assert [pid for pid, _ in r["failed"]] == ["filter.N=1"] and "N must be >= 2" in r["failed"][0][1]
    assert r["done"] == 2
    assert "N must be >= 2" in (tmp_path / "f" / "filter.N=1" / "error.txt").read_text().splitlines()[0]
    assert list(r["dataset"]["status"].values) == [1, 0, 0] and np.isnan(r["dataset"]["armse"].values[0])
    (tmp_path / "f" / "filter.N=1" / "error.txt").unlink()
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)  # the failed point is retried
    assert (r["done"], r["skipped"], [pid for pid, _ in r["failed"]]) == (0, 2, ["filter.N=1"])
    assert (tmp_path / "f" / "filter.N=1" / "error.txt").is_file()

    # a point that raises while running, then succeeds once the cause is gone
    real = runner.run_experiment

    def flaky(cfg, out, progress=False):
        if cfg.filter.N == 20:
            raise RuntimeError("boom")
        return real(cfg, out, progress)

    s2 = s.model_copy(update={"grid": {"filter.N": [10, 20]}})
    (tmp_path / "f" / "filter.N=20" / "done.json").unlink()
    monkeypatch.setattr(runner, "run_experiment", flaky)
    r = run_sweep(s2, out=tmp_path, scheduler="synchronous", progress=False)
    assert r["failed"] == [("filter.N=20", "RuntimeError: boom")] and (r["done"], r["skipped"]) == (0, 1)
    err = (tmp_path / "f" / "filter.N=20" / "error.txt").read_text()
    assert err.startswith("RuntimeError: boom\n") and "Traceback" in err
    monkeypatch.setattr(runner, "run_experiment", real)
    r = run_sweep(s2, out=tmp_path, scheduler="synchronous", progress=False)
    assert (r["done"], r["skipped"], r["failed"]) == (1, 1, [])
    assert not (tmp_path / "f" / "filter.N=20" / "error.txt").exists()
    assert (r["dataset"]["status"] == 0).all() and np.isfinite(r["dataset"]["armse"]).all()


def test_only_runs_part_of_the_grid_and_gathers_what_is_finished(tmp_path):
    """--only runs a part of the grid now, the rest later, in one folder: the results of the parts add up to the whole
    grid run at once, point for point."""
    s = Sweep(name="o", kind="run", config=ETKF, grid={"filter.N": [10, 20], "filter.infl": [1.02, 1.05]})
    first = run_sweep(s, out=tmp_path / "parts", scheduler="synchronous", progress=False, only=["filter.infl=1.02"])
    assert (first["done"], first["skipped"], first["not_run"], first["failed"]) == (2, 0, 2, [])
    st = first["dataset"]["status"].sel({"filter.infl": 1.05})
    assert (st == 2).all() and np.isnan(first["dataset"]["armse"].sel({"filter.infl": 1.05})).all()
    assert not (tmp_path / "parts" / "o" / "filter.N=10,filter.infl=1.05").exists()  # nothing run, nothing written
    # alternatives on one axis, axes combined: N=10 or N=20, and infl 1.05
    second = run_sweep(s, out=tmp_path / "parts", scheduler="synchronous", progress=False,
                       only=["filter.N=10", "filter.N=20", "filter.infl=1.05"])
    assert (second["done"], second["skipped"], second["not_run"]) == (2, 2, 0)
    whole = run_sweep(s, out=tmp_path / "whole", scheduler="synchronous", progress=False)
    for k in ("armse", "armse_ci", "status"):
        np.testing.assert_array_equal(second["dataset"][k].values, whole["dataset"][k].values)
    again = run_sweep(s, out=tmp_path / "parts", scheduler="synchronous", progress=False, only=["filter.N=10"])
    assert (again["done"], again["skipped"], again["not_run"]) == (0, 4, 0)  # finished points count whatever --only says
    for only, match in ((["filter.M=3"], "filter.M is not an axis"), (["filter.N=15"], "not a value of the axis"),
                        (["filter.N"], "expected key.sub=value")):
        with pytest.raises(ConfigError, match=match):
            run_sweep(s, out=tmp_path / "bad", scheduler="synchronous", progress=False, only=only)
    assert not (tmp_path / "bad").exists()  # refused before anything is made


def test_train_sweep_shares_one_training(tmp_path, monkeypatch):
    calls = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = Sweep(name="tr", kind="train", config=TINY, grid={"evaluate.observations.sigma": [0.5, 1.0]},
              evaluate={"cycles": 200, "burn_in": 10, "batch": 2},
              budgets={"reduced": ["train.max_steps=4", "evaluate.cycles=50"], "full": {"train.max_steps": 8}})
    r = run_sweep(s.with_budget(None), out=tmp_path, scheduler="synchronous", progress=False)
    assert r["failed"] == [] and r["done"] == 2 and len(calls) == 1
    root = tmp_path / "tr-reduced"
    trains = list(root.glob("train-*"))
    assert len(trains) == 1 and (trains[0] / "best" / "model.json").is_file()
    assert json.loads((trains[0] / "checkpoint.json").read_text())["step"] == 4  # the budget's train.max_steps
    dones = [json.loads((root / f"evaluate.observations.sigma={v}" / "done.json").read_text()) for v in (0.5, 1.0)]
    assert {d["training"]["dir"] for d in dones} == {str(trains[0])}
    assert [d["cycles"] for d in dones] == [50, 50]  # evaluate block, then the budget's evaluate.cycles
    cfgs = [yaml.safe_load((root / f"evaluate.observations.sigma={v}" / "config.yaml").read_text()) for v in (0.5, 1.0)]
    assert [c["observations"]["sigma"] for c in cfgs] == [0.5, 1.0]
    assert {c["filter"]["method"] for c in cfgs} == {"learned"}
    assert list(r["dataset"]["armse"].values) == [d["armse"] for d in dones]
    assert r["dataset"]["armse"].values[0] != r["dataset"]["armse"].values[1]
    # the rerun neither trains nor evaluates again
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)
    assert (r["done"], r["skipped"], len(calls)) == (0, 2, 1)


def test_a_network_finished_by_another_sweep_is_evaluated_not_trained_again(tmp_path, monkeypatch):
    """Two studies that share a point (the same training config) train it once: the second sweep copies the finished
    network into its own folder, and its scores are those of training it itself."""
    calls = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = Sweep(name="a", kind="train", config=TINY, grid={"evaluate.observations.sigma": [0.5]},
                  evaluate={"cycles": 50, "burn_in": 10, "batch": 2})
    second = Sweep(name="b", kind="train", config=TINY, grid={"evaluate.observations.sigma": [1.0]},
                   evaluate={"cycles": 50, "burn_in": 10, "batch": 2})
    run_sweep(first, out=tmp_path / "shared", scheduler="synchronous", progress=False)
    r = run_sweep(second, out=tmp_path / "shared", scheduler="synchronous", progress=False)
    assert r["failed"] == [] and r["done"] == 1 and len(calls) == 1
    (copied,) = (tmp_path / "shared" / "b").glob("train-*")
    done = json.loads((copied / "done.json").read_text())
    assert done["dir"] == str(copied) and done["copied_from"] == str(tmp_path / "shared" / "a" / copied.name)
    alone = run_sweep(second, out=tmp_path / "alone", scheduler="synchronous", progress=False)
    assert len(calls) == 2
    assert float(r["dataset"]["armse"][0]) == float(alone["dataset"]["armse"][0])


def test_tune_sweep_keeps_the_best_hyperparameters(tmp_path):
    s = Sweep(name="tu", kind="tune", config=ETKF, grid={"filter.N": [10, 20]}, tune=["infl=1.0,1.05"])
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)
    assert r["failed"] == []
    ds = r["dataset"]
    for N in (10, 20):
        table = pd.read_csv(tmp_path / "tu" / f"filter.N={N}" / "tune.csv")
        best = table.loc[table["armse"].idxmin()]
        at = ds.sel({"filter.N": N})
        assert float(at["armse"]) == pytest.approx(best["armse"])
        assert float(at["best_filter.infl"]) == best["filter.infl"]


def test_tune_seed_scores_values_chosen_on_another_seed(tmp_path):
    """With tune_seed the grid runs on that seed and the point's score is a run of the best values on its own seed:
    equal to tuning on the tuning seed by hand, then running the winner on the scored seed."""
    s = Sweep(name="ts", kind="tune", config=ETKF | {"seed": 3}, grid={"filter.N": [10]}, tune=["infl=1.0,1.05,1.1"],
              tune_seed=7)
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)
    assert r["failed"] == []
    d = tmp_path / "ts" / "filter.N=10"
    tuning = pd.read_csv(d / "tuning" / "tune.csv")
    winner = tuning.loc[tuning["armse"].idxmin()]
    at = r["dataset"].sel({"filter.N": 10})
    assert float(at["best_filter.infl"]) == winner["filter.infl"]
    assert float(at["tune_armse"]) == pytest.approx(winner["armse"])
    by_hand = runner.run_experiment(runner.validate(runner.RunConfig, ETKF | {
        "seed": 3, "filter": ETKF["filter"] | {"infl": float(winner["filter.infl"])}}), None)
    assert float(at["armse"]) == by_hand["armse"]  # the scored seed's run, not the tuning run's score
    assert float(at["armse"]) != pytest.approx(winner["armse"], rel=1e-9)


@pytest.mark.parametrize("tune_seed", [7, None])
def test_tune_point_where_every_value_diverges_is_a_result_not_a_failure(tmp_path, tune_seed):
    """A filter lost at every tuned value (e.g. the EnKF-N below L96's unstable dimension) is a finding of the study:
    the point is done, unscored (NaN) and counted as diverged, not retried as an error; with or without a tuning
    seed, n_diverged counts the runs lost at the least bad value."""
    s = Sweep(name="lost", kind="tune", config=ETKF | {"seed": 3, "batch": 2, "divergence_factor": 0.01},
              grid={"filter.N": [10]}, tune=["infl=1.0,1.05"], tune_seed=tune_seed)
    r = run_sweep(s, out=tmp_path, scheduler="synchronous", progress=False)
    assert r["failed"] == []
    at = r["dataset"].sel({"filter.N": 10})
    assert math.isnan(float(at["armse"]))
    if tune_seed is not None:
        assert math.isnan(float(at["tune_armse"]))
    assert int(at["n_diverged"]) == 2
    assert (tmp_path / "lost" / "filter.N=10" / "done.json").is_file()


def test_point_ids_are_readable_and_stable():
    assert point_id({"filter.N": 20}) == "filter.N=20"
    assert point_id({"filter.N": 20, "filter.infl": 1.05}) == "filter.N=20,filter.infl=1.05"
    assert point_id({"observations.sites": [0, 2]}) == "observations.sites=_0,2_"
    assert point_id({"a": "x/y z"}) == "a=x_y_z"


@pytest.mark.parametrize("fields, match", [
    ({"grid": {"filter.N": []}}, "grid.filter.N: no values"),
    ({"grid": {"filter.N": [5, 5]}}, "grid.filter.N: repeated"),
    ({"grid": {}}, "grid: at least one axis"),
    ({"kind": "bogus"}, "kind"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"tune": ["infl=1:1.1:0.05"]}, "tune: only for kind tune"),
    ({"kind": "tune"}, "tune: kind tune needs"),
    ({"grid": {"evaluate.cycles": [5]}}, "evaluate.cycles: `evaluate.` keys are only for kind train"),
    ({"set": ["cycles"]}, "set: expected key.sub=value"),
    ({"tune_seed": 1}, "tune_seed: only for kind tune"),
    ({"kind": "tune", "tune": ["infl=1,1.05"], "tune_seed": 0}, "tune_seed: 0 is the scored seed too"),
    ({"kind": "tune", "tune": ["infl=1,1.05"], "tune_seed": 1, "set": ["seed=2"]}, "tune_seed: the scored seed is"),
    ({"base": "missing.yaml"}, "missing.yaml: no such config file"),
    ({"name": "a/b"}, "name"),
])
def test_bad_sweep_files_name_the_field(tmp_path, fields, match):
    data = {"name": "s", "kind": "run", "config": ETKF, "grid": {"filter.N": [5, 10]}} | fields
    if "base" in fields:
        data.pop("config")
    with pytest.raises(ConfigError, match=match):
        load_sweep(write_sweep(tmp_path, **data))


def test_budgets(tmp_path):
    data = {"name": "s", "kind": "run", "config": ETKF, "grid": {"filter.N": [5]},
            "budgets": {"reduced": ["cycles=50"], "full": {"cycles": 500}}}
    path = write_sweep(tmp_path, **data)
    assert load_sweep(path).budget == "reduced" and load_sweep(path).folder_name == "s-reduced"
    assert load_sweep(path, "full").overrides() == [("cycles", 500)]
    with pytest.raises(ConfigError, match="budget: unknown budget 'huge'"):
        load_sweep(path, "huge")
