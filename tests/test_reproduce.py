import math

import pandas as pd
import pytest
import torch

from danlab.config import load_config
from danlab.experiments import reproduce as rp
from danlab.experiments.run_config import RunConfig, learned_eval_data
from danlab.experiments.runner import run_experiment
from danlab.learned import save_net
from danlab.nets import NetConfig, build_net
from danlab.training.train_config import TrainRunConfig

TINY = rp.Budget(cycles=150, burn_in=50, batch=2, tune_cycles=120, tune_batch=1)


def test_table_rows_and_files(tmp_path, monkeypatch):
    """Each row is what the same code computes when run on its own (the EnKF-N row equals a direct run of
    configs/l96/enkf_n.yaml at the budget; the learned row equals `danlab eval` of its weights), the 3D-Var row
    is scored with the scale tuned on another seed, a missing network says so, and the files say the same."""
    weights = tmp_path / "weights"
    save_net(weights / "l96_linear_ne1", build_net(NetConfig(kind="linear", Nf=4, Nbl=1, Nl=1)),
             {"trained_with": TrainRunConfig().model_dump(mode="json")})
    monkeypatch.setattr(rp, "WEIGHTS", weights)
    df = rp.reproduce_table(True, tmp_path / "out", threads=1, progress=False, budget=TINY)
    by = df.set_index("method")
    budget = [f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0", "threads=1"]
    for name, n in (("EnKF-N, N = 20", 20), ("EnKF-N, N = 40", 40)):
        direct = run_experiment(load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml", [f"filter.N={n}"] + budget), None)
        assert by.loc[name, "armse"] == direct["armse"] and by.loc[name, "armse_ci"] == direct["armse_ci"]
    assert by.loc["EnKF-N, N = 40", "armse"] != by.loc["EnKF-N, N = 20", "armse"]
    best, _ = rp.tune_on_seed(rp.CONFIGS / "var3d.yaml", ["threads=1"], [rp.VAR3D_GRID], cycles=TINY.tune_cycles,
                              burn_in=min(300, TINY.tune_cycles // 3), batch=TINY.tune_batch, seed=1)
    var3d = run_experiment(load_config(RunConfig, rp.CONFIGS / "var3d.yaml",
                                       ["threads=1"] + [f"{k}={v}" for k, v in best.items()] + budget[:-1]), None)
    assert by.loc["3D-Var, tuned B", "armse"] == var3d["armse"]
    assert by.loc["3D-Var, tuned B", "note"] == f"tuned on seed 1: filter.scale={best['filter.scale']}"
    learned = run_experiment(rp._learned_config(weights / "l96_linear_ne1", TINY, seed=0).model_copy(update={"threads": 1}), None)
    assert by.loc["linear a_θ, Ne = 1, N_f = 40", "armse"] == learned["armse"]
    assert pd.isna(by.loc["a_θ, Ne = 1, N_f = 40", "armse"]) and "no weights" in by.loc["a_θ, Ne = 1, N_f = 40", "note"]
    for f in ("table.md", "table.csv", "table.png", "summary.json"):
        assert (tmp_path / "out" / f).is_file()
    md = (tmp_path / "out" / "table.md").read_text()
    a20 = by.loc["EnKF-N, N = 20"]
    assert f"| EnKF-N, N = 20 | 0.191 | {a20.armse:.3f} ± {a20.armse_ci:.3f} |  |" in md
    assert "| a_θ, Ne = 1, N_f = 40 | 0.191 | no weights | no weights in weights/l96_nf40_ne1 yet |" in md
    assert "| a_θ, Ne = 10, N_f = 40, energy score | — | no weights |" in md  # no published number: a dash
    assert "nan" not in md
    assert f"{TINY.batch} experiments × {TINY.cycles - TINY.burn_in} cycles after {TINY.burn_in}" in md
    back = pd.read_csv(tmp_path / "out" / "table.csv").set_index("method")
    assert back.loc["EnKF-N, N = 40", "armse"] == by.loc["EnKF-N, N = 40", "armse"]


KS_TINY = rp.Budget(cycles=40, burn_in=10, batch=1, tune_cycles=30, tune_batch=1)


def test_ks_table_rows_are_the_configs_runs(tmp_path, monkeypatch):
    """`reproduce table --model ks`: every row is the same code's run of configs/ks (the ETKF row: its inflation tuned
    on seed 1, then a direct run with that value on seed 0; climatology and optimal interpolation as plain runs), the
    published column is DAPPER's, and a missing KS network says so (an empty weights folder here, whatever is shipped)."""
    monkeypatch.setattr(rp, "WEIGHTS", tmp_path / "weights")
    df = rp.reproduce_table(True, tmp_path / "out", threads=1, progress=False, model="ks", budget=KS_TINY)
    by = df.set_index("method")
    assert list(by.index) == [r.name for r in rp.TABLES["ks"].rows]
    budget = ["cycles=40", "burn_in=10", "batch=1", "seed=0", "threads=1"]
    clim = run_experiment(load_config(RunConfig, rp.CONFIG_ROOT / "ks" / "climatology.yaml", budget), None)
    assert by.loc["Climatology", "armse"] == clim["armse"] and 1.0 < clim["armse"] < 1.6  # the attractor's std, 1.3
    oi = by.loc["Optimal interpolation (3D-Var, B = climatological covariance)", "armse"]
    assert by.loc["3D-Var, tuned B", "armse"] < oi < clim["armse"]
    best, _ = rp.tune_on_seed(rp.CONFIG_ROOT / "ks" / "etkf.yaml", ["threads=1", "filter.N=20"], ["infl=1.02,1.03,1.05"],
                              cycles=30, burn_in=10, batch=1, seed=1)
    etkf = run_experiment(load_config(RunConfig, rp.CONFIG_ROOT / "ks" / "etkf.yaml", ["threads=1", "filter.N=20"] + [
        f"{k}={v}" for k, v in best.items()] + budget[:-1]), None)
    assert by.loc["ETKF, N = 20, tuned inflation", "armse"] == etkf["armse"]
    assert by.loc["ETKF, N = 20, tuned inflation", "note"] == f"tuned on seed 1: filter.infl={best['filter.infl']}"
    assert "no weights in weights/ks_ne1" in by.loc["a_θ, Ne = 1", "note"]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| method | published aRMSE (DAPPER, Bocquet et al. 2019 setup) |" in md
    assert f"| Climatology | 1.3 | {clim['armse']:.3f} ± {clim['armse_ci']:.3f} |" in md
    assert "Kuramoto–Sivashinsky twin (Nx 128" in md and "nan" not in md


def test_bar_chart_of_a_table_without_published_numbers(tmp_path):
    """The QG table has no published score in any row (None throughout): its chart is still drawn."""
    df = pd.DataFrame([{"method": "a", "paper": None, "armse": 0.3, "armse_ci": 0.01},
                       {"method": "b", "paper": None, "armse": float("nan"), "armse_ci": float("nan")}])
    rp._bar_chart(df, tmp_path / "t.png", rp.TABLES["qg"].published)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_every_table_row_is_a_valid_config():
    """Each row of each model's table names a config that loads with its overrides and tuning grids (the QG rows,
    too slow to run here, included), or a weights folder."""
    from danlab.experiments.runner import parse_grid
    for model, table in rp.TABLES.items():
        for row in table.rows:
            if row.kind == "learned":
                continue
            cfg = load_config(RunConfig, rp.CONFIG_ROOT / model / row.what, list(row.over))
            for g in row.grids:
                name, values = parse_grid(g)
                for v in values:
                    load_config(RunConfig, rp.CONFIG_ROOT / model / row.what, list(row.over) + [f"{name}={v}"])
            assert cfg.model.name == {"l96": "lorenz96", "ks": "ks", "qg": "qg"}[model]


def test_transfer_runs_the_same_weights_at_other_sizes(tmp_path, monkeypatch):
    """Each row runs the given weights at that Nx (the score equals `danlab eval --nx Nx` of the same weights) and
    the EnKF-N with N = Nx at that Nx; the sizes give different numbers, and the table shows them."""
    w = tmp_path / "w"
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": TrainRunConfig().model_dump(mode="json")})
    df = rp.reproduce_transfer(tmp_path / "out", True, weights=str(w), sizes=(20, 80), threads=1, progress=False,
                               budget=TINY)
    assert list(df["Nx"]) == [20, 80]
    budget = [f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0", "threads=1"]
    for row in df.itertuples():
        data = learned_eval_data(TrainRunConfig().model_dump(mode="json"), w, cycles=TINY.cycles, burn_in=TINY.burn_in,
                                 batch=TINY.batch, Nx=row.Nx)
        learned = run_experiment(load_config(RunConfig, data=data | {"threads": 1}), None)
        assert row.learned_armse == learned["armse"] and row.learned_ci == learned["armse_ci"]
        enkf = run_experiment(load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml",
                                          [f"model.Nx={row.Nx}", f"filter.N={row.Nx}"] + budget), None)
        assert row.baseline_armse == enkf["armse"]
        assert 0.2 < row.learned_armse < 0.6 and 0.1 < row.baseline_armse < 0.5  # a nudging with gain 0.3; EnKF-N
    assert df["learned_armse"].nunique() == 2 and df["baseline_armse"].nunique() == 2
    md = (tmp_path / "out" / "transfer.md").read_text()
    r = df.iloc[1]
    assert f"| 80 | {r.learned_armse:.3f} ± {r.learned_ci:.3f} | {r.baseline_armse:.3f} ± {r.baseline_ci:.3f} |" in md
    assert "| Nx | a_θ (trained at Nx 40, Ne 1) | EnKF-N, N = Nx |" in md


def test_transfer_table_says_when_some_experiments_were_lost(tmp_path, monkeypatch):
    """A side that lost the truth in some of its experiments shows the others' score and how many were lost, as the
    other tables do (a run where the baseline loses 1 of 2 stands in for the LETKF at an unstable inflation)."""
    w = tmp_path / "w"
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": TrainRunConfig().model_dump(mode="json")})
    real = rp.run_experiment

    def one_lost(cfg, out):
        s = real(cfg, out)
        return s | {"n_diverged": 1, "experiments": 2} if cfg.filter.method == "enkf_n" else s
    monkeypatch.setattr(rp, "run_experiment", one_lost)
    df = rp.reproduce_transfer(tmp_path / "out", True, weights=str(w), sizes=(20,), threads=1, progress=False,
                               budget=TINY)
    md = (tmp_path / "out" / "transfer.md").read_text()
    r = df.iloc[0]
    assert f"| 20 | {r.learned_armse:.3f} ± {r.learned_ci:.3f} | {r.baseline_armse:.3f} ± {r.baseline_ci:.3f} (1 of 2 " \
           "diverged) |" in md


def test_ks_transfer_keeps_the_grid_spacing(tmp_path):
    """On KS the weights run at Nx 64 on a domain of half the length (the trained resolution), beside the LETKF of
    configs/ks/letkf.yaml on the same resized twin."""
    w = tmp_path / "w"
    trained = load_config(TrainRunConfig, "configs/ks/dan_ne1.yaml").model_dump(mode="json")
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": trained})
    b = rp.Budget(cycles=30, burn_in=10, batch=1, tune_cycles=20, tune_batch=1)
    df = rp.reproduce_transfer(tmp_path / "out", True, weights=str(w), sizes=(64,), threads=1, progress=False,
                               model="ks", budget=b)
    data = learned_eval_data(trained, w, cycles=30, burn_in=10, batch=1, Nx=64)
    assert data["model"]["Nx"] == 64 and data["model"]["length"] == pytest.approx(16 * math.pi)
    assert df["learned_armse"].iloc[0] == run_experiment(load_config(RunConfig, data=data | {"threads": 1}), None)["armse"]
    letkf = run_experiment(load_config(RunConfig, rp.CONFIG_ROOT / "ks" / "letkf.yaml", [
        "model.Nx=64", f"model.length={16 * math.pi!r}", "cycles=30", "burn_in=10", "batch=1", "seed=0", "threads=1"]), None)
    assert df["baseline_armse"].iloc[0] == letkf["armse"]
    assert "| Nx | a_θ (trained at Nx 128, Ne 1) | LETKF, N = 16" in (tmp_path / "out" / "transfer.md").read_text()


def test_sparsity_runs_one_network_at_each_fraction(tmp_path):
    """Each row evaluates the same weights where a random `fraction` of the sites is observed (the score equals a run
    of the network with those observations) beside the EnKF-N N 20 whose xN was tuned on seed 1 at that fraction."""
    w = tmp_path / "w"
    trained = TrainRunConfig().model_dump(mode="json") | {"observations": {"kind": "random", "count_min": 10, "count_max": 40}}
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": trained})
    df = rp.reproduce_sparsity(tmp_path / "out", True, weights=str(w), threads=1, progress=False, budget=TINY,
                               fractions=(0.5, 1.0))
    assert list(df["fraction"]) == [0.5, 1.0]
    budget = [f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0", "threads=1"]
    for row in df.itertuples():
        data = learned_eval_data(trained, w, cycles=TINY.cycles, burn_in=TINY.burn_in, batch=TINY.batch)
        data |= {"threads": 1, "observations": {"kind": "random", "fraction": row.fraction, "sigma": 1.0}}
        learned = run_experiment(load_config(RunConfig, data=data), None)
        assert row.learned_armse == learned["armse"]
        over = ["threads=1", "filter.N=20", "observations.kind=random", f"observations.fraction={row.fraction}"]
        best, _ = rp.tune_on_seed(rp.CONFIGS / "enkf_n.yaml", over, [rp.XN_GRID], cycles=TINY.tune_cycles,
                                  burn_in=TINY.tune_cycles // 3, batch=TINY.tune_batch, seed=1)
        assert row.enkf_n_xN == best["filter.xN"]
        enkf = run_experiment(load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml", over + [f"filter.xN={best['filter.xN']}"]
                                          + budget[:-1]), None)
        assert row.enkf_n_armse == enkf["armse"] and row.ratio == learned["armse"] / enkf["armse"]
    assert df["learned_armse"].iloc[0] > df["learned_armse"].iloc[1]  # fewer observations, a larger error
    md = (tmp_path / "out" / "sparsity.md").read_text()
    gone = dict(df.iloc[0]) | {"learned_armse": float("nan"), "learned_diverged": TINY.batch, "ratio": float("nan")}
    assert "| 0.5 | diverged (2 of 2) |" in rp.sparsity_markdown([gone], TINY, w) and "nan" not in rp.sparsity_markdown([gone], TINY, w)
    r = df.iloc[0]
    assert f"| 0.5 | {r.learned_armse:.3f} ± {r.learned_ci:.3f} | {r.enkf_n_armse:.3f} ± {r.enkf_n_ci:.3f}" in md


def test_window_comparison_rows_and_files(tmp_path, monkeypatch):
    """Every point is the same code's run of its config (the IEnKS row equals a direct run of ienks.yaml with
    that lag and Δt), 4D-Var is tuned at each lag, the EnKF and the learned a_θ (Δt 0.05 only) have no window,
    the files say the same, and a rerun into the same folder reuses every classical point."""
    b = rp.WindowBudget(cycles=40, burn_in=10, batch=1, tune_cycles=30, lags=(1, 2), var4d_scales=(0.02, 0.05))
    df = rp.reproduce_window(tmp_path / "out", True, threads=1, progress=False, budget=b)
    assert len(df) == 2 * (1 + 2 * 2) + 1
    ienks = df[(df["method"] == "IEnKS, N 20") & (df["lag"] == 2) & (df["dt"] == 0.2)].iloc[0]
    direct = run_experiment(load_config(RunConfig, rp.CONFIGS / "ienks.yaml", [
        "threads=1", "model.substeps=4", "filter.N=20", "filter.lag=2", "cycles=40", "burn_in=10", "batch=1", "seed=0"]), None)
    assert ienks["armse"] == direct["armse"] and ienks["armse_s"] == direct["armse_s"]
    var4d = df[df["method"] == "4D-Var"]
    assert var4d["tuned"].str.startswith("scale=").all() and var4d["armse_s"].notna().all()
    assert (df[df["method"].isin(["EnKF (ETKF), N 20", "learned a_θ"])]["lag"] == 0).all()
    assert list(df[df["method"] == "learned a_θ"]["dt"]) == [0.05]
    for f in ("window.md", "window.csv", "window.png", "summary.json"):
        assert (tmp_path / "out" / f).is_file()
    md = (tmp_path / "out" / "window.md").read_text()
    assert f"| 0.2 | IEnKS, N 20 | 2 | {ienks.armse:.3f} ± {ienks.armse_ci:.3f} | {ienks.armse_s:.3f} | — |" in md
    assert "nan" not in md
    # resumed: only the a_θ line (one evaluation) is run again, and the table is the same
    calls = []
    real = rp.run_experiment
    monkeypatch.setattr(rp, "tune_on_seed", lambda *a, **k: pytest.fail("a tuned point was recomputed"))
    monkeypatch.setattr(rp, "run_experiment", lambda cfg, out: calls.append(cfg.filter.method) or real(cfg, out))
    again = rp.reproduce_window(tmp_path / "out", True, threads=1, progress=False, budget=b)
    assert calls == ["learned"]
    pd.testing.assert_frame_equal(again.drop(columns="cycles_per_s"), df.drop(columns="cycles_per_s"))  # a_θ's timing differs
    assert (again["cycles_per_s"] == df["cycles_per_s"]).sum() == len(df) - 1


def test_nonlinearity_rows_are_the_same_codes_runs(tmp_path, monkeypatch):
    """At each Δt the retrained network's row equals its evaluation at that Δt, the Δt-0.05 network is run unchanged
    at the larger Δt, a missing network says so, and each classical row is tuned on seed 1 then scored on seed 0."""
    nets = {}
    for s in (1, 2):
        trained = TrainRunConfig().model_dump(mode="json")
        trained["model"]["substeps"] = s
        nets[s] = tmp_path / f"w{s}"
        net = build_net(NetConfig(Nf=4, Nbl=1, Nl=1))
        with torch.no_grad():  # two different networks
            for p in net.parameters():
                p.mul_(1 + 0.3 * s)
        save_net(nets[s], net, {"trained_with": trained})
    weights = lambda s: str(nets.get(s, tmp_path / "absent"))
    df = rp.reproduce_nonlinearity(tmp_path / "out", True, threads=1, progress=False, budget=TINY, steps=(1, 2, 4),
                                   weights=weights)
    by = df.set_index(["dt", "method"])
    assert len(df) == 3 * 3 + 1 + 2 * 2
    budget = [f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0", "threads=1"]
    for s, w in ((2, nets[2]), (2, nets[1])):
        data = learned_eval_data(load_config(TrainRunConfig, data={}).model_dump(mode="json") | {
            "model": {"name": "lorenz96", "Nx": 40, "F": 8.0, "dt": 0.05, "substeps": s}}, w, cycles=TINY.cycles,
            burn_in=TINY.burn_in, batch=TINY.batch) | {"threads": 1}
        name = "a_θ retrained at Δt" if w == nets[2] else "a_θ trained at Δt 0.05"
        assert by.loc[(0.1, name), "armse"] == run_experiment(load_config(RunConfig, data=data), None)["armse"]
    assert by.loc[(0.1, "a_θ retrained at Δt"), "armse"] != by.loc[(0.1, "a_θ trained at Δt 0.05"), "armse"]
    assert math.isnan(by.loc[(0.2, "a_θ retrained at Δt"), "armse"]) and "no weights" in by.loc[(0.2, "a_θ retrained at Δt"), "note"]
    over = ["threads=1", "model.substeps=4", "filter.N=20", "filter.prior=N", "filter.infl=1.0"]
    best, _ = rp.tune_on_seed(rp.CONFIGS / "ienkf.yaml", over, [rp.XN_GRID], cycles=TINY.tune_cycles,
                              burn_in=TINY.tune_cycles // 3, batch=TINY.tune_batch, seed=1)
    ienkf = run_experiment(load_config(RunConfig, rp.CONFIGS / "ienkf.yaml", over + [f"filter.xN={best['filter.xN']}"]
                                       + budget[:-1]), None)
    assert by.loc[(0.2, "IEnKF, N 20, -N prior"), "armse"] == ienkf["armse"]
    assert by.loc[(0.2, "IEnKF, N 20, -N prior"), "tuned"] == f"xN={best['filter.xN']}"
    md = (tmp_path / "out" / "nonlinearity.md").read_text()
    r = by.loc[(0.2, "IEnKF, N 20, -N prior")]
    assert f"{r.armse:.3f} ± {r.armse_ci:.3f} (xN={best['filter.xN']})" in md and "nan" not in md
    assert (tmp_path / "out" / "nonlinearity.png").is_file()
    # resumed into the same folder: every computed row is reused, only the network that has appeared since is run
    trained = TrainRunConfig().model_dump(mode="json")
    trained["model"]["substeps"] = 4
    nets[4] = tmp_path / "w4"
    save_net(nets[4], build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": trained})
    calls = []
    real = rp.run_experiment
    monkeypatch.setattr(rp, "tune_on_seed", lambda *a, **k: pytest.fail("a tuned row was recomputed"))
    monkeypatch.setattr(rp, "run_experiment", lambda cfg, out: calls.append(cfg.model.substeps) or real(cfg, out))
    again = rp.reproduce_nonlinearity(tmp_path / "out", True, threads=1, progress=False, budget=TINY, steps=(1, 2, 4),
                                      weights=weights)
    assert calls == [4]
    pd.testing.assert_frame_equal(again.drop(index=again.index[again["dt"] == 0.2]),
                                  df.drop(index=df.index[df["dt"] == 0.2]))
    assert again.set_index(["dt", "method"]).loc[(0.2, "a_θ retrained at Δt"), "armse"] > 0


def test_sparsity_scores_the_config_xn_when_every_tuned_value_diverged(tmp_path, monkeypatch, capsys):
    """A fraction where every xN of the grid lost the truth in a tuning experiment (tune_on_seed finds no best)
    is scored with the config's xN and said untuned, instead of ending the whole study in a traceback."""
    w = tmp_path / "w"
    trained = TrainRunConfig().model_dump(mode="json") | {"observations": {"kind": "random", "count_min": 10, "count_max": 40}}
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": trained})
    monkeypatch.setattr(rp, "tune_on_seed", lambda *a, **k: ({}, {}))
    df = rp.reproduce_sparsity(tmp_path / "out", True, weights=str(w), threads=1, progress=True, budget=TINY,
                               fractions=(0.5,))
    default = load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml").filter.xN
    assert df["enkf_n_xN"].tolist() == [default] and df["enkf_n_tuned"].tolist() == [False]
    over = ["threads=1", "filter.N=20", "observations.kind=random", "observations.fraction=0.5",
            f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0"]
    assert df["enkf_n_armse"].iloc[0] == run_experiment(load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml", over), None)["armse"]
    assert "untuned: every xN of the grid lost the truth on seed 1" in (tmp_path / "out" / "sparsity.md").read_text()
    assert "untuned" in capsys.readouterr().out
