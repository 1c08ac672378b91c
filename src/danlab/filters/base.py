"""What every filter shares: the analysis interface, ensemble statistics, hyperparameters per experiment.

A filter is a frozen pydantic model: its fields are its hyperparameters (validated, with ranges), its
`analysis` maps a forecast ensemble E^f (B, N, Nx) and one cycle's observations to E^a. The forecast is
the model applied to every member (`cycle`); only filters that must see the model inside the analysis
(the IEnKF) override `cycle`.

A tunable hyperparameter (listed in `tunable`) may also be a tensor of shape (B,): one value per
experiment, so that a whole tuning grid runs as one batched run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from danlab.observations import Obs
from danlab.rng import BatchRNG


def per_batch(value, E: torch.Tensor):
    """A hyperparameter as a python float, or a (B,) tensor viewed as (B, 1, ..., 1) to broadcast against E."""
    if isinstance(value, torch.Tensor):
        return value.to(E).view(-1, *([1] * (E.dim() - 1)))
    return value


def mean_and_anomalies(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble mean (B, Nx) and normalised anomalies X = (E - mean)/sqrt(N-1), (B, N, Nx); E a tensor or a NumPy
    array (the IEnKS iterates in NumPy)."""
    N = E.shape[-2]
    xb = E.mean(-2, keepdims=True)
    return xb.squeeze(-2), (E - xb) / math.sqrt(max(N - 1, 1))


def spread(E: torch.Tensor, xb: torch.Tensor | None = None) -> torch.Tensor:
    """sqrt of the mean over sites of the ensemble variance, (...,) for E (..., N, Nx); 0 for a single member.
    xb: the ensemble mean E.mean(-2), if already computed."""
    if E.shape[-2] < 2:
        return torch.zeros(E.shape[:-2], dtype=E.dtype, device=E.device)
    # the N - 1 normalised variance of the members, in two passes: torch.var over the members of a (64, 20, 40)
    # float64 batch took 0.95 ms on a 2-core AVX-512 Xeon against 0.08 ms for these five calls (equal to round-off)
    X = E - (E.mean(-2) if xb is None else xb).unsqueeze(-2)
    return ((X * X).sum(-2) / (E.shape[-2] - 1)).mean(-1).sqrt()


def centred_normal(E: torch.Tensor, rng: BatchRNG | None) -> torch.Tensor:
    """Standard normal draws per member and site, shaped like E (B, N, Nx), centred over the members and rescaled
    to unit variance: perturbations that leave the ensemble mean unchanged."""
    if rng is None:
        raise ValueError("perturbed observations draw random numbers: this analysis needs a generator")
    N = E.shape[-2]
    e = rng.randn(N, E.shape[-1], dtype=E.dtype, device=E.device)
    return (e - e.mean(-2, keepdim=True)) * math.sqrt(N / (N - 1))


def rows_ok(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) True where every entry of the row of each (B, ...) tensor is finite."""
    ok = None
    for t in tensors:
        t = t.flatten(1)
        # the largest magnitude of a row is finite iff every entry is (amax propagates NaN): 3x cheaper than
        # isfinite(t).all(-1) on a (64, 20, 20) batch, which made the checks cost a third of the eigh
        f = torch.isfinite(t.abs().amax(-1)) if t.shape[-1] else torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        ok = f if ok is None else ok & f
    return ok


def sanitise(ok: torch.Tensor, t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """t with the rows where `ok` is False replaced by `value` (t itself, untouched, when every row is ok)."""
    if bool(ok.all()):
        return t
    return torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, torch.as_tensor(value, dtype=t.dtype, device=t.device))


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every entry of every tensor (or NumPy array) is finite, in one reduction each: a sum is finite only
    if all its terms are (a finite batch so large that its sum overflows reads False; callers then check it row by
    row). The usual case of the checks below, in a few calls instead of a dozen."""
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return math.isfinite(total)


def zero_bad_rows(ok: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ok & rows_ok(t), t with the rows not ok set to 0): a blown-up row's vector kept out of the arithmetic that
    follows, its experiment flagged at the end. Both come back untouched in the usual case, all ok and t finite."""
    if bool(ok.all()) and all_finite(t):
        return ok, t
    ok = ok & rows_ok(t)
    return ok, sanitise(ok, t)


def flag_rows(ok: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """E with the rows where `ok` is False set to NaN: the DA loop then flags those experiments as diverged."""
    return sanitise(ok, E, float("nan"))


def safe_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eigh of a batch of symmetric matrices that never raises: (lam, V, ok). A row that is not finite, or
    on which LAPACK fails to converge (an ensemble blown up to huge values), is replaced by the identity and
    reported in ok (B,) as False, so that its filter can mark that experiment diverged; the other rows are
    decomposed exactly as they would be on their own (the batched decomposition works matrix by matrix).

    G may be a NumPy array (the IEnKS iterates in NumPy): LAPACK then runs through torch on the same memory (MKL,
    faster here than NumPy's at 20 x 20), the usual case's checks in NumPy, and NumPy arrays come back."""
    arr = isinstance(G, np.ndarray)
    Gt = torch.from_numpy(G) if arr else G
    if all_finite(G):  # the usual case
        try:
            lam, V = torch.linalg.eigh(Gt)
        except torch.linalg.LinAlgError:
            pass  # found and replaced row by row below
        else:
            lam, V = (lam.numpy(), V.numpy()) if arr else (lam, V)
            if all_finite(lam, V):
                ok = np.ones(len(G), dtype=bool) if arr else torch.ones(G.shape[0], dtype=torch.bool, device=G.device)
                return lam, V, ok
    lam, V, ok = _eigh_by_rows(Gt)
    return (lam.numpy(), V.numpy(), ok.numpy()) if arr else (lam, V, ok)


def _eigh_by_rows(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`safe_eigh` of a batch with a bad row: the bad rows found and decomposed as the identity."""
    ok = rows_ok(G)
    eye = lambda: torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)  # noqa: E731 (only for a bad row)
    G = torch.where(ok.view(-1, 1, 1), G, eye()) if not bool(ok.all()) else G
    try:
        lam, V = torch.linalg.eigh(G)
    except torch.linalg.LinAlgError:  # rare: find the rows that fail, one at a time, and replace them
        bad = torch.zeros_like(ok)
        for b in range(G.shape[0]):
            try:
                torch.linalg.eigh(G[b])
            except torch.linalg.LinAlgError:
                bad[b] = True
        ok = ok & ~bad
        G = torch.where(ok.view(-1, 1, 1), G, eye())
        lam, V = torch.linalg.eigh(G)
    ok = ok & rows_ok(lam, V)
    return lam, V, ok


def sym_eig_fn(G: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition G = V diag(lam) V^T of a batch of symmetric matrices; returns (V, fn(lam)). Rows
    that cannot be decomposed (see `safe_eigh`) come back as NaN, so that they propagate to that experiment's
    analysis only."""
    lam, V, ok = safe_eigh(G)
    return V, flag_rows(ok, fn(lam))


def apply_sym(V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """V diag(d) V^T for batches (tensors or NumPy arrays)."""
    # a tensor's unsqueeze costs less than its indexing by None (a NumPy array has no unsqueeze)
    return (V * (d.unsqueeze(-2) if isinstance(d, torch.Tensor) else d[..., None, :])) @ V.mT


class Filter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    N: int = Field(20, ge=1, description="ensemble size")
    tunable: ClassVar[tuple[str, ...]] = ()
    min_N: ClassVar[int] = 1
    # False for a method that ignores the observations (climatology): it cannot lose a truth it never tracks, so
    # only a non-finite state flags it; its error sits at the climatological spread, near the divergence threshold
    tracks_truth: ClassVar[bool] = True
    # True for a method that differentiates the model inside its analysis (4D-Var's adjoint by autograd): its cycles
    # run under no_grad, the others' under inference_mode, which also skips autograd's bookkeeping of views and
    # versions (the same kernels, so the same numbers; measured: 14 % less time for an EnKF-N analysis of N 20)
    autograd: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check_N(self):
        if self.N < self.min_N:
            raise ValueError(f"N must be >= {self.min_N} for {type(self).__name__} (got {self.N})")
        return self

    def prepare(self, model, observer, dtype, device) -> "Filter":
        """Return the filter ready to run with this model (e.g. with a climatological B); default: itself."""
        return self

    def resolved(self) -> dict:
        """Hyperparameters that prepare() settled rather than the config (a run's summary reports them); none here."""
        return {}

    def cycle(self, E: torch.Tensor, model, obs: Obs, rng: BatchRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """One DA cycle from the previous analysis E: returns (E^f, E^a)."""
        Ef = model(E)
        return Ef, self.analysis(Ef, obs, rng)

    def analysis(self, E: torch.Tensor, obs: Obs, rng: BatchRNG) -> torch.Tensor:
        """The analysis ensemble from the forecast E (B, N, Nx) and this cycle's observations."""
        raise NotImplementedError(f"{type(self).__name__} does not implement an analysis")

    # The DA loop drives every filter through start/step/restart. A filter is a function of the previous
    # analysis alone, so its carried state is that analysis; a smoother over a window (`WindowFilter`)
    # carries more, and also returns its smoothed ensemble, `lag` cycles back.

    def start(self, E: torch.Tensor):
        """The carried state of the DA loop, from the initial ensemble E (B, N, Nx) at time 0."""
        return E

    def step(self, carry, model, obs: Obs, rng: BatchRNG):
        """One DA cycle: (new carry, E^f, E^a at the new time, the smoothed ensemble n cycles back or None,
        n)."""
        Ef, Ea = self.cycle(carry, model, obs, rng)
        return Ea, Ef, Ea, None, 0

    def restart(self, carry, bad: torch.Tensor, x: torch.Tensor):
        """The carry with the rows where `bad` (B,) is True restarted from the states x (B, Nx)."""
        return torch.where(bad.view(-1, 1, 1), x.unsqueeze(-2).expand_as(carry), carry)


@dataclass(frozen=True)
class Window:
    """A smoother's carried state: the ensemble at the start of its data-assimilation window, (B, N, Nx),
    and the observations of the window already seen (the next cycle's observation comes on top)."""

    E: torch.Tensor
    obs: tuple[Obs, ...] = ()
    unconverged: torch.Tensor | None = None  # (B,) analyses whose iterations had not converged, so far
    pending: int = 0  # the newest observations of `obs` not assimilated yet (shift S > 1: an analysis every S)
    current: torch.Tensor | None = None  # the latest estimate, at the newest time (None: E, at time 0)


class WindowFilter(Filter):
    """A smoother over a data-assimilation window of `lag` cycles, shifted by one cycle (S = 1, the default; S > 1
    below) at every cycle (Bocquet & Sakov 2014). The window [t_{k-L}, t_k] holds the observations y_{k-L+1}, ..., y_k and
    the prior (background) at t_{k-L}; the analysis of the window (`window_analysis`) weighs the
    observation l cycles into it by beta_l:

    - single data assimilation (mda False, SDA): only y_k, new to this window, with beta = 1; the others
      were assimilated by the earlier windows, whose analyses the prior at t_{k-L} comes from;
    - multiple data assimilation (mda True, MDA): every observation of the window with beta = 1/L, so that
      each is assimilated, by parts, in the L windows that hold it. The prior at t_{k-L} then holds y_{k-L+l}
      with the weight (L - l)/L only, so the filtering (at t_k) and smoothing (at t_{k-L}) estimates come from
      a second, balancing analysis from the same prior with beta_l = l/L; the main analysis is the one
      carried forward.

    At the start of a run the window grows from the initial time until it holds L observations (n < L:
    the window start stays at time 0; in MDA the weights are then beta_l = 1/L, balancing (L - n + l)/L).
    The filtering analysis at t_k is the analysed ensemble at t_{k-L} run through the window by the model;
    its first cycle is the next window's prior. The smoothed ensemble at t_{k-L} is returned once the
    window is full.

    Shift S > 1 (DAPPER's iEnKS has S = 1 only): the window slides by S cycles and is analysed every S cycles, when
    it holds S new observations. SDA assimilates those S together (beta = 1 for them, 0 for the older ones); MDA (L a
    multiple of S) every observation of the window with beta = S/L, each being in L/S windows, and balances an
    observation l cycles into the window, already assimilated (n - l) // S times, with 1 - ((n - l) // S) S/L.
    In between, the estimate at each new time is the forecast of the last analysis (nothing newer is known in real
    time), so the filtering scores mix analyses and forecasts of up to S - 1 cycles; the smoothed ensemble is the
    one at the window start t_{k-L} of each analysis, scored every S cycles. Its cost per cycle is about 1/S that
    of S = 1 at the same lag.
    """

    lag: int = Field(1, ge=1, description="length L of the data-assimilation window, in cycles")
    mda: bool = Field(False, description="multiple data assimilation (each observation in L/S windows, S/L each)")
    shift: int = Field(1, ge=1, description="cycles S the window slides between analyses (S <= L; MDA: L a multiple of S)")

    @model_validator(mode="after")
    def _check_shift(self):
        if self.shift > self.lag:
            raise ValueError(f"filter.shift must be <= filter.lag (got shift={self.shift}, lag={self.lag}): the window "
                             "would skip observations")
        if self.mda and self.lag % self.shift:
            raise ValueError(f"filter.mda with filter.shift={self.shift} needs filter.lag a multiple of it (got "
                             f"lag={self.lag}): each observation is assimilated in lag/shift windows")
        return self

    def start(self, E: torch.Tensor) -> Window:
        return Window(E)

    def restart(self, carry: Window, bad: torch.Tensor, x: torch.Tensor) -> Window:
        current = None if carry.current is None else super().restart(carry.current, bad, x)
        return Window(super().restart(carry.E, bad, x), carry.obs, carry.unconverged, carry.pending, current)

    def cycle(self, E: torch.Tensor, model, obs: Obs, rng: BatchRNG) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lag != 1:
            raise ValueError(f"{type(self).__name__} with lag {self.lag} carries a window: run it by start/step")
        _, Ef, Ea, _, _ = self.step(self.start(E), model, obs, rng)
        return Ef, Ea

    def step(self, carry: Window, model, obs: Obs, rng: BatchRNG):
        seq = carry.obs + (obs,)
        n, L, S = len(seq), self.lag, self.shift
        if carry.pending + 1 < S:  # no analysis this cycle (S > 1): the estimate is the last one's forecast
            Ef = model(carry.E if carry.current is None else carry.current)
            return Window(carry.E, seq, carry.unconverged, carry.pending + 1, Ef), Ef, Ef, None, 0
        E0 = self.window_prior(carry.E)
        weights = [S / L] * n if self.mda else [0.0] * (n - S) + [1.0] * S
        Ef, E0a, run, converged = self.window_analysis(E0, model, seq, weights)
        unconverged = (0 if carry.unconverged is None else carry.unconverged) + (~converged).long()
        Ea, Es = run[-1], E0a
        if self.mda and L > 1:
            # what the prior still lacks of each observation: 1 - ((n - l) // S) S/L, i.e. (L - n + l)/L for S = 1
            lack = [(L - (n - l) // S * S) / L for l in range(1, n + 1)]
            _, Es, balanced, converged = self.window_analysis(E0, model, seq, lack)
            Ea, unconverged = balanced[-1], unconverged + (~converged).long()
        # the window slides by the d oldest cycles, so that it holds L observations after the next S (d = 1 once
        # full for S = 1); while it grows from time 0 its start stays there
        d = max(0, n - (L - S))
        nxt = Window(run[d - 1], seq[d:], unconverged, 0, Ea) if d else Window(E0a, seq, unconverged, 0, Ea)
        return nxt, Ef, Ea, (Es if n == L else None), n

    def window_prior(self, E: torch.Tensor) -> torch.Tensor:
        """The prior ensemble at the window start from the carried one (e.g. inflated); default: itself."""
        return E

    def window_analysis(self, E0: torch.Tensor, model, obs: tuple[Obs, ...], weights: list[float]):
        """Analysis of one window from the prior E0 at its start: (E^f at its end from the first
        iteration, the analysed ensemble at its start, the list of that ensemble run by the model to
        each observation time of the window, (B,) False where the iterations stopped unconverged)."""
        raise NotImplementedError


def window_run(model, E: torch.Tensor, n: int) -> list[torch.Tensor]:
    """E run by the model through n cycles: the list of the n states after each."""
    out = []
    for _ in range(n):
        E = model(E)
        out.append(E)
    return out
