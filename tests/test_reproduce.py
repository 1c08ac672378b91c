import pandas as pd

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
    monkeypatch.setattr(rp, "QUICK", TINY)
    df = rp.reproduce_table(True, tmp_path / "out", threads=1, progress=False)
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


def test_transfer_runs_the_same_weights_at_other_sizes(tmp_path, monkeypatch):
    """Each row runs the given weights at that Nx (the score equals `danlab eval --nx Nx` of the same weights) and
    the EnKF-N with N = Nx at that Nx; the sizes give different numbers, and the table shows them."""
    w = tmp_path / "w"
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": TrainRunConfig().model_dump(mode="json")})
    monkeypatch.setattr(rp, "QUICK", TINY)
    df = rp.reproduce_transfer(tmp_path / "out", True, weights=str(w), sizes=(20, 80), threads=1, progress=False)
    assert list(df["Nx"]) == [20, 80]
    budget = [f"cycles={TINY.cycles}", f"burn_in={TINY.burn_in}", f"batch={TINY.batch}", "seed=0", "threads=1"]
    for row in df.itertuples():
        data = learned_eval_data(TrainRunConfig().model_dump(mode="json"), w, cycles=TINY.cycles, burn_in=TINY.burn_in,
                                 batch=TINY.batch, Nx=row.Nx)
        learned = run_experiment(load_config(RunConfig, data=data | {"threads": 1}), None)
        assert row.learned_armse == learned["armse"] and row.learned_ci == learned["armse_ci"]
        enkf = run_experiment(load_config(RunConfig, rp.CONFIGS / "enkf_n.yaml",
                                          [f"model.Nx={row.Nx}", f"filter.N={row.Nx}"] + budget), None)
        assert row.enkf_n_armse == enkf["armse"]
        assert 0.2 < row.learned_armse < 0.6 and 0.1 < row.enkf_n_armse < 0.5  # a nudging with gain 0.3; EnKF-N
    assert df["learned_armse"].nunique() == 2 and df["enkf_n_armse"].nunique() == 2
    md = (tmp_path / "out" / "transfer.md").read_text()
    r = df.iloc[1]
    assert f"| 80 | {r.learned_armse:.3f} ± {r.learned_ci:.3f} | {r.enkf_n_armse:.3f} ± {r.enkf_n_ci:.3f} |" in md


def test_window_comparison_rows_and_files(tmp_path):
    """Every point is the same code's run of its config (the IEnKS row equals a direct run of ienks.yaml with
    that lag and Δt), 4D-Var is tuned at each lag, the EnKF and the learned a_θ (Δt 0.05 only) have no window,
    and the files say the same."""
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
