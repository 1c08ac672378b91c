import pandas as pd

from danlab.experiments import reproduce as rp
from danlab.learned import save_net
from danlab.nets import NetConfig, build_net
from danlab.training.config import TrainRunConfig

TINY = rp.Budget(cycles=150, burn_in=50, batch=2, tune_cycles=120, tune_batch=1)


def test_table_rows_and_files(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    save_net(weights / "l96_linear_ne1", build_net(NetConfig(kind="linear", Nf=4, Nbl=1, Nl=1)),
             {"trained_with": TrainRunConfig().model_dump(mode="json")})
    monkeypatch.setattr(rp, "WEIGHTS", weights)
    monkeypatch.setattr(rp, "QUICK", TINY)
    df = rp.reproduce_table(True, tmp_path / "out", threads=1, progress=False)
    assert list(df["paper"]) == [0.191, 0.179, 0.40, 0.191, 0.185, 0.384, 0.382]
    by = df.set_index("method")
    assert 0.1 < by.loc["EnKF-N, N = 20", "armse"] < 0.4
    assert 0.25 < by.loc["3D-Var, tuned B", "armse"] < 0.6 and "scale" in by.loc["3D-Var, tuned B", "note"]
    assert 0.2 < by.loc["linear a_θ, Ne = 1, N_f = 40", "armse"] < 0.6  # untrained: a nudging with gain 0.3
    assert pd.isna(by.loc["a_θ, Ne = 1, N_f = 40", "armse"]) and "no weights" in by.loc["a_θ, Ne = 1, N_f = 40", "note"]
    for f in ("table.md", "table.csv", "table.png", "summary.json"):
        assert (tmp_path / "out" / f).is_file()
    assert "| EnKF-N, N = 20 | 0.191 |" in (tmp_path / "out" / "table.md").read_text()


def test_transfer_runs_the_same_weights_at_other_sizes(tmp_path, monkeypatch):
    w = tmp_path / "w"
    save_net(w, build_net(NetConfig(Nf=4, Nbl=1, Nl=1)), {"trained_with": TrainRunConfig().model_dump(mode="json")})
    monkeypatch.setattr(rp, "QUICK", TINY)
    df = rp.reproduce_transfer(tmp_path / "out", True, weights=str(w), sizes=(20, 80), threads=1, progress=False)
    assert list(df["Nx"]) == [20, 80]
    assert (df["learned_armse"] > 0).all() and (df["enkf_n_armse"] < 0.5).all()
    assert (tmp_path / "out" / "transfer.md").is_file()
