"""The DA loop: one loop for every filter, classical or learned, recording per-cycle statistics."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from danlab.filters.base import spread
from danlab.metrics import combine_ci, mean_with_ci, rank_counts, rmse
from danlab.rng import BatchRNG
from danlab.twin import TwinStream


@dataclass
class CycleResult:
    """Per-cycle statistics, arrays of shape (B, K), and the per-experiment divergence flags."""

    rmse_f: np.ndarray
    rmse_a: np.ndarray
    spread_f: np.ndarray
    spread_a: np.ndarray
    diverged: np.ndarray  # (B,) bool
    diverged_at: np.ndarray  # (B,) first diverged cycle, -1 if never
    burn_in: int
    wall_s: float
    extra: dict = field(default_factory=dict)
    rmse_s: np.ndarray | None = None  # (B, K) a smoother's RMSE at cycle k, NaN where not (yet) smoothed
    rank_hist: np.ndarray | None = None  # (B, N + 1) an ensemble's rank histogram of the truth (scored cycles, all sites)

    @property
    def B(self) -> int:
        return self.rmse_a.shape[0]

    @property
    def cycles(self) -> int:
        return self.rmse_a.shape[1]

    def scores(self, rows=None) -> dict:
        """aRMSE ± CI and mean spread over the (non-diverged) experiments among `rows`."""
        rows = np.arange(self.B) if rows is None else np.asarray(rows)
        ok = rows[~self.diverged[rows]]
        k0 = self.burn_in
        per = [mean_with_ci(self.rmse_a[b, k0:]) for b in ok]
        armse, ci = combine_ci([p[0] for p in per], [p[1] for p in per])
        extra = {}
        if self.rmse_s is not None:  # scored over the cycles smoothed (the last `lag` cycles are not)
            per = [mean_with_ci(s[np.isfinite(s)]) for s in (self.rmse_s[b, k0:] for b in ok)]
            armse_s, ci_s = combine_ci([p[0] for p in per], [p[1] for p in per])
            extra = {"armse_s": armse_s, "armse_s_ci": ci_s}
        if self.rank_hist is not None and ok.size:  # the scored experiments' histogram, as frequencies
            counts = self.rank_hist[ok].sum(0)
            total = max(counts.sum(), 1)
            extra["rank_hist"] = [float(c) / total for c in counts]
        if "unconverged" in self.extra:  # analyses whose iterations stopped at their maximum, all cycles
            extra["unconverged"] = int(self.extra["unconverged"][rows].sum())
        return {
            "armse": armse,
            "armse_ci": ci,
            "frmse": float(self.rmse_f[ok, k0:].mean()) if ok.size else float("nan"),
            "spread": float(self.spread_a[ok, k0:].mean()) if ok.size else float("nan"),
            # calibration: the mean spread over the mean analysis RMSE (about 1 for an ensemble that knows its error)
            "spread_ratio": (float(self.spread_a[ok, k0:].mean() / self.rmse_a[ok, k0:].mean())
                             if ok.size and self.spread_a[ok, k0:].any() else float("nan")),
            "experiments": int(rows.size),
            "n_diverged": int(self.diverged[rows].sum()),
            "diverged": bool(self.diverged[rows].any()),
            **extra,
        }


def initial_ensemble(x: torch.Tensor, N: int, rng: BatchRNG, std: float = 1.0) -> torch.Tensor:
    """N members around the true states x (B, Nx), perturbed with N(0, std^2) (a single state: N = 1)."""
    return x.unsqueeze(-2) + std * rng.randn(N, x.shape[-1], dtype=x.dtype, device=x.device)


def divergence_threshold(x: torch.Tensor, factor: float) -> float:
    """The analysis RMSE above which a trajectory counts as lost: `factor` times the truth's climatological
    spread (a filter that has lost the truth sits near sqrt(2) times that spread)."""
    return factor * float(x.std())


def lost(err: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where a trajectory has lost the truth: its error is not below the threshold, or not finite (a
    non-finite member makes the mean, hence the error, non-finite, and NaN < t is False)."""
    return ~(err < threshold)


def run_cycles(filt, model, twin: TwinStream, cycles: int, burn_in: int, seed: int,
               ids: list[int] | None = None, init_std: float = 1.0, divergence_factor: float = 1.2,
               progress: bool = False) -> CycleResult:
    """Cycle `filt` for `cycles` cycles on the twin experiment; the first `burn_in` are not scored.

    A run that diverges (a non-finite ensemble, or an analysis RMSE above `divergence_factor` times the
    truth's climatological spread: worse than the climatological mean, where a filter that has lost the
    truth sits, near sqrt(2) times that spread) is flagged from that cycle on and excluded from the scores; its
    ensemble is reset to the truth so that it cannot spoil the batched linear algebra of the others.

    A smoother (a filter with a window of `lag` cycles) is also scored at the start of its window: rmse_s
    of the cycle k - lag, once y_k has been assimilated.
    """
    if not 0 <= burn_in < cycles:
        raise ValueError(f"burn_in must be in [0, cycles) (got burn_in={burn_in}, cycles={cycles})")
    B = twin.B
    filter_rng = BatchRNG(seed, "filter", B, ids)
    E = initial_ensemble(twin.x, filt.N, BatchRNG(seed, "init", B, ids), init_std)
    carry = filt.start(E)
    lag = getattr(filt, "lag", 0)
    truths = deque([twin.x], maxlen=lag + 1)  # the truth at the last lag + 1 times, the newest last
    threshold = divergence_threshold(twin.x, divergence_factor) if getattr(filt, "tracks_truth", True) else math.inf
    # per-cycle statistics, kept as tensors of the states' dtype and device and read back once at the end:
    # RMSE of the forecast and analysis means (K, 2, B), spreads (K, 2, B) only for an ensemble (N > 1),
    # the smoother's RMSE (K, B). Each cycle costs a handful of tensor calls (see benchmarks/filter_speed.py).
    dev = twin.x.device
    rms = torch.full((cycles, 2, B), float("nan"), dtype=twin.x.dtype, device=dev)
    spr = torch.zeros((cycles, 2, B), dtype=twin.x.dtype, device=dev) if filt.N > 1 else None
    rms_s = torch.full((cycles, B), float("nan"), dtype=twin.x.dtype, device=dev) if lag else None
    # an ensemble's rank histogram of the truth among its analysis members, over the scored cycles and every site
    ranks = torch.zeros((B, filt.N + 1), dtype=torch.long, device=dev) if filt.N > 1 else None
    diverged = torch.zeros(B, dtype=torch.bool)
    diverged_at = torch.full((B,), -1, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad() if filt.autograd else torch.inference_mode():
        for k in tqdm(range(cycles), disable=not progress, desc=type(filt).__name__, mininterval=1.0):
            x, obs = twin.step()
            truths.append(x)
            carry, Ef, E, Es, n = filt.step(carry, model, obs, filter_rng)
            if Es is not None and k >= n:  # the smoothed state at cycle k - n (time 0 is no cycle)
                rms_s[k - n] = rmse(Es.mean(-2), truths[-1 - n])
            # forecast and analysis means in one (2, B, Nx) tensor; a single member is its own mean (and has no
            # spreads or ranks: spr and ranks exist for N > 1 only). An ensemble's two spreads come from the same
            # stack, in one (2, B) tensor: the same numbers as each ensemble's on its own, in half the tensor calls
            if E.shape[-2] == 1:
                means = torch.stack([Ef[..., 0, :], E[..., 0, :]])
            else:
                EfE = torch.stack([Ef, E])
                means = EfE.mean(-2)
                spr[k] = spread(EfE, means)
                if k >= burn_in:
                    r_k = rank_counts(E, x)
                    ranks.scatter_add_(1, r_k, torch.ones_like(r_k))
            r = rmse(means, x)
            rms[k] = r
            bad = lost(r[1], threshold)
            if bool(bad.any()):
                # restart from the truth (from 0 where the truth itself is not finite: it never spreads to the others)
                x0 = torch.where(torch.isfinite(x), x, 0.0)
                carry = filt.restart(carry, bad, x0)
                bad = bad.cpu()  # the bookkeeping lives on the CPU, whatever the states' device
                diverged_at[bad & ~diverged] = k
                diverged |= bad
    wall = time.perf_counter() - t0
    stats = [rms[:, 0], rms[:, 1]] + ([spr[:, 0], spr[:, 1]] if spr is not None else [torch.zeros_like(rms[:, 0])] * 2)
    stats = torch.stack(stats + ([rms_s] if lag else [])).to("cpu", torch.float64)
    s = stats.numpy().transpose(0, 2, 1)
    dv = diverged.numpy()
    s[:, dv, :] = np.where(np.arange(cycles) >= diverged_at.numpy()[dv, None], np.nan, s[:, dv, :])
    unconverged = getattr(carry, "unconverged", None)
    extra = {} if unconverged is None else {"unconverged": unconverged.cpu().numpy()}
    return CycleResult(rmse_f=s[0], rmse_a=s[1], spread_f=s[2], spread_a=s[3], diverged=dv,
                       diverged_at=diverged_at.numpy(), burn_in=burn_in, wall_s=wall, extra=extra,
                       rmse_s=s[4] if lag else None, rank_hist=None if ranks is None else ranks.cpu().numpy())
