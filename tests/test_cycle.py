import json
import math

import numpy as np
import pytest
import torch
import xarray as xr

from danlab.config import ConfigError, load_config
from danlab.cycle import run_cycles
from danlab.experiments.run_config import RunConfig
from danlab.experiments.runner import parse_grid, run_experiment, simulate, tune
from danlab.filters.ensemble import ETKF
from danlab.metrics import integrated_autocorr_time, mean_with_ci
from danlab.models import Lorenz96
from danlab.observations import Observer
from danlab.twin import TwinStream

SHORT = {"cycles": 300, "burn_in": 100, "filter": {"method": "etkf", "N": 20, "infl": 1.02}}


def test_autocorrelation_time_of_ar1():
    rng = np.random.default_rng(0)
    phi, n = 0.8, 200_000
    x = np.empty(n)
    x[0] = 0
    e = rng.standard_normal(n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    tau = integrated_autocorr_time(x)
    assert abs(tau - (1 + phi) / (1 - phi)) < 0.5  # 9 for phi = 0.8
    assert abs(integrated_autocorr_time(rng.standard_normal(n)) - 1) < 0.05
    # the CI covers the true mean at about the nominal rate for short correlated series
    hits = 0
    for s in range(200):
        m, hw = mean_with_ci(x[s * 1000:(s + 1) * 1000])
        hits += abs(m) < hw
    assert 0.85 < hits / 200 < 0.99


def test_divergence_is_flagged_not_averaged():
    """An analysis that runs away from the truth (error far above climatology) in one experiment: the
    run does not crash, that experiment is flagged from the cycle it diverged and excluded, the others
    are scored as if it had not been there."""

    class RunsAway(ETKF):
        def analysis(self, E, obs, rng):
            E = super().analysis(E, obs, rng)
            shift = torch.zeros(E.shape[0], 1, 1, dtype=E.dtype)
            shift[2] = 40.0  # row 2 runs away: +40 on every site
            return E + shift

    m, o = Lorenz96(), Observer(40)
    ids = [0, 1, 2]
    res = run_cycles(RunsAway(N=20, infl=1.02), m, TwinStream(m, o, 3, 0, ids=ids), 200, 50, 0, ids=ids)
    ref = run_cycles(ETKF(N=20, infl=1.02), m, TwinStream(m, o, 2, 0, ids=ids[:2]), 200, 50, 0, ids=ids[:2])
    assert res.diverged.tolist() == [False, False, True] and res.diverged_at[2] == 0
    assert np.isnan(res.rmse_a[2]).all() and not np.isnan(res.rmse_a[:2]).any()
    s = res.scores()
    assert s["diverged"] and s["n_diverged"] == 1 and s["experiments"] == 3
    assert abs(s["armse"] - ref.scores()["armse"]) < 1e-2  # equal up to chaos-amplified round-off


def test_nan_ensemble_is_flagged():
    class Broken(ETKF):
        def analysis(self, E, obs, rng):
            E = super().analysis(E, obs, rng)
            return torch.where(torch.arange(E.shape[0]).view(-1, 1, 1) == 1, torch.nan, E)

    m, o = Lorenz96(), Observer(40)
    ids = [0, 1, 2]
    res = run_cycles(Broken(N=20, infl=1.02), m, TwinStream(m, o, 3, 0, ids=ids), 50, 10, 0, ids=ids)
    assert res.diverged.tolist() == [False, True, False] and res.diverged_at[1] == 0
    assert math.isfinite(res.scores()["armse"])


def test_batched_runs_equal_runs_alone():
    cfg = load_config(RunConfig, data=SHORT | {"batch": 3})
    alone = load_config(RunConfig, data=SHORT | {"batch": 1, "seed": 0})
    rb, ra = simulate(cfg), simulate(alone)
    # equal up to round-off, which the chaotic dynamics amplify (~x10 per 10 cycles): compare 60 cycles
    np.testing.assert_allclose(rb.rmse_a[0, :60], ra.rmse_a[0, :60], rtol=0, atol=1e-10)


def test_same_seed_same_numbers_other_seed_other_numbers():
    a = simulate(load_config(RunConfig, data=SHORT))
    b = simulate(load_config(RunConfig, data=SHORT))
    c = simulate(load_config(RunConfig, data=SHORT | {"seed": 1}))
    assert np.array_equal(a.rmse_a, b.rmse_a) and not np.array_equal(a.rmse_a, c.rmse_a)


def test_tuning_grid_is_one_batched_run_equal_to_separate_runs(tmp_path):
    cfg = load_config(RunConfig, data=SHORT | {"batch": 2})
    res = tune(cfg, [parse_grid("infl=1.02:1.08:0.03")], tmp_path)
    assert [p["filter.infl"] for p in res["table"]] == [1.02, 1.05, 1.08]
    for p in res["table"]:
        single = run_experiment(load_config(RunConfig, data=SHORT | {"batch": 2}, overrides=[f"filter.infl={p['filter.infl']}"]), None)
        assert abs(single["armse"] - p["armse"]) < 1e-10
    assert res["armse"] == min(p["armse"] for p in res["table"])
    ds = xr.open_dataset(tmp_path / "tune.nc")
    assert "filter.infl" in ds.coords and ds["armse"].shape == (3,)
    # a non-tunable axis (ensemble size) loops over separate runs
    res2 = tune(cfg, [parse_grid("filter.N=5,10"), parse_grid("infl=1.05")], None)
    assert [p["filter.N"] for p in res2["table"]] == [5, 10]


def test_run_folder(tmp_path):
    s = run_experiment(load_config(RunConfig, data=SHORT), tmp_path)
    for f in ("config.yaml", "stats.nc", "summary.json", "rmse.png"):
        assert (tmp_path / f).is_file()
    ds = xr.open_dataset(tmp_path / "stats.nc")
    assert ds["rmse_a"].shape == (1, 300)
    assert abs(float(ds["rmse_a"][0, 100:].mean()) - s["armse"]) < 1e-12
    assert json.loads((tmp_path / "summary.json").read_text())["armse"] == s["armse"]
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert again == load_config(RunConfig, data=SHORT)
    # an ensemble's calibration: the rank histogram of the truth over the scored cycles and sites, and spread / aRMSE
    counts = ds["rank_hist"].values
    assert counts.shape == (1, 21) and counts.sum() == 200 * 40 and list(ds["rank"].values) == list(range(21))
    assert s["rank_hist"] == pytest.approx(list(counts[0] / counts.sum()), abs=1e-15)
    ratio = float(ds["spread_a"][0, 100:].mean() / ds["rmse_a"][0, 100:].mean())
    assert s["spread_ratio"] == pytest.approx(ratio, rel=1e-12) and 0.5 < ratio < 2


def test_rank_histogram_of_a_calibrated_and_a_collapsed_ensemble():
    """Exact ranks on a hand-made case; statistically, members drawn like the truth give a flat histogram and an
    ensemble with a tenth of the spread a U shape (the truth mostly outside it)."""
    from danlab.metrics import rank_counts
    E = torch.tensor([[[0.0, 5.0], [2.0, 1.0], [1.0, 3.0]]])  # (B 1, N 3, Nx 2)
    assert rank_counts(E, torch.tensor([[1.5, 0.0]])).tolist() == [[2, 0]]
    g = torch.Generator().manual_seed(0)
    x, E = torch.randn(2000, 40, generator=g), torch.randn(2000, 9, 40, generator=g)
    flat = torch.bincount(rank_counts(E, x).flatten(), minlength=10) / (2000 * 40)
    assert torch.allclose(flat, torch.full((10,), 0.1), atol=0.005)  # 80,000 draws: sd of a bin 0.001
    u = torch.bincount(rank_counts(0.1 * E, x).flatten(), minlength=10) / (2000 * 40)
    assert u[0] > 0.4 and u[-1] > 0.4


@pytest.mark.parametrize("spec", ["infl", "infl=1:0:0.1", "infl=a:b:c"])
def test_bad_grid(spec):
    with pytest.raises(ConfigError):
        parse_grid(spec)


def test_one_divergence_test_for_scored_runs_and_training():
    """A trajectory is lost when its error is not below the threshold or not finite; the trainer's resets
    and run_cycles' divergence flags use this same test (cycle.lost) and the same kind of threshold."""
    from danlab.cycle import divergence_threshold, lost
    err = torch.tensor([0.5, 1.0, 1.5, float("nan"), float("inf")])
    assert lost(err, 1.0).tolist() == [False, True, True, True, True]
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) * 3.0
    assert divergence_threshold(x, 1.2) == pytest.approx(1.2 * float(x.std()))
