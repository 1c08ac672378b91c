"""Diagnostics of a learned analysis (danlab.diagnostics, `danlab analyse`): known maps recovered to round-off,
spectra, sensitivity of a known x-dependence, the Lorenz 96 Lyapunov spectrum, and the command's bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from danlab.diagnostics import (ensemble_covariance, eigenspectra, error_moments, extent, lyapunov_spectrum, net_map,
                                operator_expansion, pa_jacobian, pa_least_squares, principal_cosines, sensitivity_maps,
                                sensitivity_tensor, subspace_alignment, sym_eigvals, translation_average)
from danlab.diagnostics.expansion import sample_innovations, zero_innovation_response
from danlab.diagnostics.lyapunov import random_alignment
from danlab.diagnostics.sensitivity import sensitivity_tensor_ls
from danlab.diagnostics.spectra import translation_rows
from danlab.learned import Learned, save_net
from danlab.models import Lorenz96
from danlab.nets import NetConfig, build_net
from danlab.observations import Observer
from danlab.rng import BatchRNG

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
f64 = torch.float64


def danlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "danlab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)


def spd(Nx, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(Nx, Nx, generator=g, dtype=f64)
    return A @ A.T / Nx + 0.1 * torch.eye(Nx, dtype=f64)


def circulant(Nx, length=1.5):
    off = torch.arange(Nx)
    d = torch.minimum(off, Nx - off).to(f64)
    c = torch.exp(-(d / length) ** 2)
    return c, torch.stack([c.roll(i) for i in range(Nx)])  # C[i, j] = c(j - i)


def x_dependent(Nx, alpha=0.05):
    """a(x, ζ) = P(x) ζ with P_ij(x) = c(j-i) (1 + α (x_i + x_j)): ∂P_ij/∂x_k = α c(j-i) (δ_ik + δ_jk)."""
    c, C = circulant(Nx)

    def P(x):
        return C * (1 + alpha * (x[..., :, None] + x[..., None, :]))

    def amap(x, z):
        return (P(x) @ z.unsqueeze(-1)).squeeze(-1)

    off = torch.arange(Nx) - Nx // 2
    S = alpha * c[off % Nx][:, None] * ((off[None, :] == 0).to(f64) + (off[None, :] == off[:, None]).to(f64))
    return amap, P, S  # S[p, q]: the exact translation-averaged sensitivity


def test_linear_map_recovered_to_round_off():
    Nx, S = 12, 3
    P = spd(Nx)
    amap = lambda x, z: z @ P.T  # noqa: E731
    x = torch.randn(S, Nx, dtype=f64)
    assert torch.allclose(pa_jacobian(amap, x), P.expand(S, Nx, Nx), atol=1e-13, rtol=0)
    P_ls, res = pa_least_squares(amap, x, sample_innovations(S, 30, Nx, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(P_ls, P.expand(S, Nx, Nx), atol=1e-12, rtol=0)
    assert res.max() < 1e-12
    ds = operator_expansion(amap, x, n_samples=40)
    assert float(ds["rel_diff"].max()) < 1e-12 and float(ds["asymmetry_jacobian"].max()) < 1e-14
    lam = np.linalg.eigvalsh(P.numpy())
    assert np.allclose(ds["min_eig_jacobian"].values, lam[0], atol=1e-12)
    # the spectrum code recovers P's spectrum (sorted decreasing), and the ratio of two maps per mode
    assert np.allclose(sym_eigvals(P).numpy(), lam[::-1], atol=1e-12)
    sp = eigenspectra(P.expand(S, Nx, Nx), 0.5 * P.expand(2, Nx, Nx))
    assert np.allclose(sp["eig_dan"].values, lam[::-1], atol=1e-12)
    assert np.allclose(sp["eig_ratio"].values, 2.0, atol=1e-12)
    # an asymmetric part is measured, and the symmetric part's spectrum is what is sorted
    K = torch.triu(torch.ones(Nx, Nx, dtype=f64), 1) * 0.01
    Pa = P + K
    ds = operator_expansion(lambda x, z: z @ Pa.T, x, n_samples=40)  # noqa: E731
    expect = float(torch.linalg.norm(Pa - Pa.T) / torch.linalg.norm(Pa))
    assert np.allclose(ds["asymmetry_ls"].values, expect, rtol=1e-10)


def test_x_dependent_map_and_its_sensitivity_recovered():
    Nx, S = 10, 4
    amap, P, S_exact = x_dependent(Nx)
    x = torch.randn(S, Nx, dtype=f64)
    assert torch.allclose(pa_jacobian(amap, x), P(x), atol=1e-13, rtol=0)
    zeta = sample_innovations(S, 25, Nx, generator=torch.Generator().manual_seed(2))
    P_ls, _ = pa_least_squares(amap, x, zeta)
    assert torch.allclose(P_ls, P(x), atol=1e-12, rtol=0)
    # the full second-derivative tensor, then its translation average
    T = sensitivity_tensor(amap, x[0])
    _, C = circulant(Nx)
    eye = torch.eye(Nx, dtype=f64)
    T_exact = 0.05 * C[:, :, None] * (eye[:, None, :] + eye[None, :, :])
    assert torch.allclose(T, T_exact, atol=1e-14, rtol=0)
    assert torch.allclose(sensitivity_tensor_ls(amap, x[0], zeta[0]), T_exact, atol=1e-12, rtol=0)
    assert torch.allclose(translation_average(T), S_exact, atol=1e-15, rtol=0)
    ds = sensitivity_maps(amap, x, zeta=zeta)
    assert np.allclose(ds["sens_mean"].values, S_exact.numpy(), atol=1e-14)
    assert np.allclose(ds["sens_ls_mean"].values, S_exact.numpy(), atol=1e-12)
    assert ds.attrs["ls_vs_jacobian"] < 1e-10
    # the extent of a known map: c(p) = exp(-(p/1.5)^2) on the diagonals q = 0 and q = p
    w = np.abs(S_exact.numpy())
    r = ds.attrs["extent"]
    cheb = np.maximum.outer(np.abs(np.arange(Nx) - Nx // 2), np.abs(np.arange(Nx) - Nx // 2))
    assert w[cheb <= r].sum() >= 0.95 * w.sum() > w[cheb <= r - 1].sum()
    assert r == 2


def test_extent_and_translation_rows():
    m = np.zeros((8, 8))
    m[4, 4] = 1.0  # offset (0, 0)
    assert extent(m) == 0
    m[4 + 3, 4 - 2] = 1.0  # offset (3, -2): half the mass at Chebyshev radius 3
    assert extent(m, 0.4) == 0 and extent(m, 0.95) == 3
    _, C = circulant(9)
    rows = translation_rows(C)
    c, _ = circulant(9)
    assert torch.allclose(rows, c[(torch.arange(9) - 4) % 9])


def test_ensemble_covariance_and_rank():
    E = torch.randn(2, 5, 8, dtype=f64)
    P = ensemble_covariance(E)
    X = E[0] - E[0].mean(0)
    assert torch.allclose(P[0], X.T @ X / 4)
    sp = eigenspectra(P, P)
    assert np.isnan(sp["eig_ratio"].values[4:]).all() and np.allclose(sp["eig_ratio"].values[:4], 1.0)


def test_principal_cosines_and_alignment():
    e = torch.eye(6, dtype=f64)
    assert torch.allclose(principal_cosines(e[:, :2], e[:, [1, 0]]), torch.ones(2, dtype=f64))
    assert torch.allclose(principal_cosines(e[:, :2], e[:, 2:4]), torch.zeros(2, dtype=f64), atol=1e-15)
    th = 0.3
    v = (torch.cos(torch.tensor(th)) * e[:, 0] + torch.sin(torch.tensor(th)) * e[:, 3]).to(f64)
    cs = principal_cosines(e[:, :2], torch.stack([v, e[:, 1]], 1))
    assert torch.allclose(cs, torch.tensor([1.0, np.cos(th)], dtype=f64))
    # the leading eigenvectors of P = diag(5, 4, 1, ...) span e0, e1
    P = torch.diag(torch.tensor([5.0, 4, 1, 1, 1, 1], dtype=f64))[None]
    assert torch.allclose(subspace_alignment(P, e[None], 2), torch.ones(1, 2, dtype=f64))
    assert 0.3 < random_alignment(40, 14, samples=200) < 0.7


def test_error_moments():
    g = np.random.default_rng(0)
    ds = error_moments({"a": {"forecast": g.normal(size=(4000, 10)), "analysis": g.laplace(size=(4000, 10))}})
    s = ds.sel(filter="a")
    assert abs(float(s["error_skewness"].sel(stage="forecast"))) < 0.05
    assert abs(float(s["error_excess_kurtosis"].sel(stage="forecast"))) < 0.1
    assert abs(float(s["error_excess_kurtosis"].sel(stage="analysis")) - 3.0) < 0.4  # Laplace: 3


def tiny_net(seed=0, kind="cnn"):
    torch.manual_seed(seed)
    net = build_net(NetConfig(kind=kind, Nf=4, Nbl=1, Nl=2, kernel=3))
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
        net.out.bias.fill_(0.01)
    return net.eval()


def test_net_map_is_the_learned_filters_increment():
    net = tiny_net()
    a = net_map(net)
    Nx = 16
    x = torch.randn(3, Nx, dtype=f64) + 2
    obs = Observer(Nx=Nx).observe(x + 0.3, BatchRNG(0, "obs", 3))
    zeta = obs.HtRinv_innovation(x)
    E = x.unsqueeze(-2)
    inc = Learned.from_net(net).analysis(E, obs, BatchRNG(0, "f", 3)) - E
    assert torch.allclose(a(x, zeta), inc[:, 0], atol=1e-6)
    b = zero_innovation_response(a, x)
    assert torch.allclose(b, a(x, torch.zeros_like(x)).norm(dim=-1) / 4, atol=1e-7)
    # the least-squares estimate approaches the network's Jacobian in ζ as the sampled innovations shrink
    assert pa_jacobian(a, x).shape == (3, Nx, Nx)
    small, large = (float(operator_expansion(a, x, n_samples=80, scale=s)["rel_diff"].max()) for s in (1e-2, 1.0))
    assert small < 1e-2 and small < large


def test_tangent_linear_is_the_models_jacobian():
    from torch.func import jacfwd, jvp
    from danlab.diagnostics.lyapunov import tangent_linear, tangent_qr_step
    m = Lorenz96(Nx=12, substeps=2)
    x = m.spinup(m.initial(torch.randn(2, 12, dtype=f64)), 5.0)
    xn, J = tangent_linear(m, x)
    assert torch.allclose(xn, m(x), atol=1e-14, rtol=0)
    for b in range(2):
        assert torch.allclose(J[b], jacfwd(m)(x[b]), atol=1e-13, rtol=0)
    Q = torch.linalg.qr(torch.randn(2, 12, 5, dtype=f64))[0]
    _, Qn, lr = tangent_qr_step(m, x, Q)
    MQ = jvp(m, (x.unsqueeze(1).expand(2, 5, 12).contiguous(),), (Q.mT.contiguous(),))[1].mT
    assert torch.allclose(Qn @ (Qn.mT @ MQ), MQ, atol=1e-12)  # span(Q') = span(M'Q)
    assert torch.allclose(lr.sum(-1), torch.linalg.svdvals(MQ).log().sum(-1), atol=1e-12)  # volume growth


def test_lyapunov_l96_fast():
    """A short check (4 trajectories × 30 time units): λ_1 near 1.7, the spectrum sums to -Nx."""
    m = Lorenz96()
    g = torch.Generator().manual_seed(0)
    x0 = m.spinup(m.initial(torch.randn(4, 40, generator=g, dtype=f64)), 20.0)
    ds = lyapunov_spectrum(m, x0, 600, transient=100, generator=g)
    lam = ds["lyapunov"].values
    assert 1.4 < lam[0] < 2.0
    assert abs(lam.sum() + 40) < 0.05  # Σ λ = the divergence of the flow, -Nx
    assert 11 <= ds.attrs["positive"] <= 15 and 12 <= ds.attrs["nonnegative"] <= 16
    assert np.all(np.diff(lam) < 0.05)  # sorted (up to the noise of neighbours)


@pytest.mark.slow
def test_lyapunov_l96_reference():
    """8 trajectories × 200 time units: λ_1 ≈ 1.7 per time unit, 13 positive exponents and a neutral one."""
    m = Lorenz96()
    g = torch.Generator().manual_seed(1)
    x0 = m.spinup(m.initial(torch.randn(8, 40, generator=g, dtype=f64)), 20.0)
    ds = lyapunov_spectrum(m, x0, 4000, transient=200, generator=g)
    lam = ds["lyapunov"].values
    assert 1.6 < lam[0] < 1.8
    assert 13 <= ds.attrs["positive"] <= 14 and 13 <= ds.attrs["nonnegative"] <= 14
    assert abs(lam[13]) < 0.03  # the neutral exponent


# ---- the command ---------------------------------------------------------------------------------------

def save_tiny(path, model=None):
    meta = {"trained_with": {"model": model or {"name": "lorenz96", "Nx": 16, "F": 8.0, "dt": 0.05, "substeps": 1},
                             "observations": {"kind": "identity", "sigma": 1.0}}}
    save_net(path, tiny_net(), meta)
    return path


def one_error_line(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("danlab: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_analyse_end_to_end_tiny(tmp_path):
    w = save_tiny(tmp_path / "net")
    out = tmp_path / "out"
    r = danlab("analyse", str(w), "--cycles", "80", "--burn-in", "40", "--snapshots", "3", "--np", "40",
               "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("b", "s", "pa_ls_vs_jacobian", "eig_dan", "eig_enkf", "eig_ratio", "sensitivity_extent",
              "lyapunov_positive", "alignment_cos", "out"):
        assert k in s, k
    assert len(s["eig_dan"]) == len(s["eig_enkf"]) == len(s["eig_ratio"]) == 10 and s["Nx"] == 16
    assert s["out"] == str(out)
    for f in ("analysis.nc", "summary.json", "spectra.png", "sensitivity.png", "lyapunov.png", "run.png"):
        assert (out / f).is_file(), f
    import xarray as xr
    with xr.open_dataset(out / "analysis.nc") as ds:
        for v in ("b_k", "pa_jacobian", "pa_ls", "pa_enkf", "eig_dan", "eig_enkf", "eig_ratio", "sens_abs", "lyapunov",
                  "alignment_cos_dan", "error_skewness"):
            assert v in ds and ds[v].dims, v
            assert "units" in ds[v].attrs, v
        assert ds["pa_jacobian"].dims == ("snapshot", "row", "col") and ds.sizes["cycle"] == 80
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_analyse_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from danlab.cli import main

    def analyse(*args):
        capsys.readouterr()
        rc = main(["analyse", *args])
        return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)

    out = tmp_path / "out"
    one_error_line(danlab("analyse", str(tmp_path / "missing"), "--out", str(out)), "missing")  # the real exit status
    ks = save_tiny(tmp_path / "ks", model={"name": "ks", "Nx": 128})
    one_error_line(analyse(str(ks), "--out", str(out)), "trained on model 'ks'")
    w = save_tiny(tmp_path / "net")
    one_error_line(analyse(str(w), "--cycles", "100", "--burn-in", "100", "--out", str(out)), "--burn-in")
    one_error_line(analyse(str(w), "--cycles", "50", "--burn-in", "80", "--out", str(out)), "--burn-in")
    for nx in ("abc", "0", "-3", "2.5", "4"):
        one_error_line(analyse(str(w), "--nx", nx, "--out", str(out)), "--nx")
    one_error_line(analyse(str(w), "--np", "10", "--out", str(out)), "--np")
    one_error_line(analyse(str(w), "--cycles", "x", "--out", str(out)), "--cycles")
    (tmp_path / "file").write_text("x")
    one_error_line(analyse(str(w), "--out", str(tmp_path / "file")), "not a folder")
    assert not out.exists()
    # the shipped network, copied, with a different model: refused before any work
    if (ROOT / "weights" / "l96_nf40_ne1" / "model.json").is_file():
        cp = tmp_path / "shipped"
        shutil.copytree(ROOT / "weights" / "l96_nf40_ne1", cp, ignore=shutil.ignore_patterns("run"))
        meta = json.loads((cp / "model.json").read_text())
        meta["trained_with"]["model"]["name"] = "qg"
        (cp / "model.json").write_text(json.dumps(meta))
        one_error_line(danlab("analyse", str(cp), "--quick", "--out", str(out)), "trained on model 'qg'")
    assert not out.exists()


def test_write_outputs_is_all_or_nothing(tmp_path, monkeypatch):
    from danlab.diagnostics import plots, run
    import xarray as xr

    def boom(*a, **k):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(plots, "plot_all", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        run.write_outputs(out, xr.Dataset({"a": (("x",), np.zeros(3))}), {"Nx": 1})
    assert not out.exists() and not list(tmp_path.iterdir())
