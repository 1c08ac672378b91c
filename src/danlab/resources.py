"""What a run will need before it starts: its memory, estimated from the config, refused with the knob to
lower when it cannot fit; and the default number of PyTorch threads for a problem of its size.

The memory estimate is deliberately generous (a few times the tensors a cycle keeps alive), because a run
that is refused at the start costs a second, while one that grows until the machine swaps or the allocator
fails loses its work.
"""

from __future__ import annotations

import os

GiB = 1024**3


def available_memory(device: str = "cpu") -> int:
    """Bytes of memory available now: the host's (psutil), or the GPU's free memory for a CUDA device."""
    if str(device).startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil
    return int(psutil.virtual_memory().available)


# a typical value of each size knob: the knob named in a refusal is the one furthest above its typical value
TYPICAL = {"cycles": 10_000, "batch": 8, "filter.N": 40, "model.Nx": 40, "filter.clim_cycles": 2000,
           "filter.clim_trajectories": 16}


def run_memory_terms(cfg, rows: int = 1) -> list[tuple[int, str, list[str]]]:
    """The main memory terms of a twin-experiment run (RunConfig `cfg`, `rows` grid points sharing each of its
    `batch` experiments), as (bytes, what, the knobs that set it), largest first."""
    f = cfg.filter
    B = cfg.batch * rows
    N, Nx, K = int(f.N), int(cfg.model.Nx), int(cfg.cycles)
    d = 8 if cfg.dtype == "float64" else 4
    terms = [
        # 4 float64 statistics per experiment and cycle, then their copies in NumPy, xarray and the plot
        (4 * K * B * 8 * 4, f"per-cycle statistics ({K} cycles × {B} experiments)", ["cycles", "batch"]),
        # the ensemble and its temporaries in the forecast (RK4) and the analysis
        (16 * B * N * Nx * d, f"the ensembles ({B} × N {N} × Nx {Nx})", ["filter.N", "model.Nx", "batch"]),
        (8 * B * Nx * d, f"the truth and observations ({B} × Nx {Nx})", ["model.Nx", "batch"]),
    ]
    if f.method in ("enkf", "etkf", "enkf_n", "ienkf"):
        terms.append((10 * B * N * N * d, f"the ensemble-space matrices ({B} × N {N} × N {N})", ["filter.N", "batch"]))
    if f.method in ("var3d", "climatology"):
        clim = 2 * int(f.clim_cycles) * int(f.clim_trajectories) * Nx * 8
        terms.append((clim, f"the climatology's free runs ({f.clim_trajectories} × {f.clim_cycles} cycles × Nx {Nx})",
                      ["filter.clim_cycles", "filter.clim_trajectories", "model.Nx"]))
    if f.method == "var3d":
        terms.append((4 * B * Nx * Nx * d + 3 * Nx * Nx * 8, f"the background covariances ({B} × Nx {Nx} × Nx {Nx})",
                      ["model.Nx", "batch"]))
    if f.method == "learned":
        terms.append((4 * 128 * B * N * Nx * d, f"the network's activations ({B} × N {N} × Nx {Nx} × its filters)",
                      ["filter.N", "model.Nx", "batch"]))
    return sorted(terms, key=lambda t: -t[0])


def _knob_values(cfg, rows: int) -> dict:
    f = cfg.filter
    return {"cycles": cfg.cycles, "batch": cfg.batch * rows, "filter.N": f.N, "model.Nx": cfg.model.Nx,
            "filter.clim_cycles": getattr(f, "clim_cycles", 0), "filter.clim_trajectories": getattr(f, "clim_trajectories", 0)}


def check_run_memory(cfg, rows: int = 1, available: int | None = None) -> int:
    """Raise ConfigError, naming the knob, when the run's estimated memory exceeds what is available; returns
    the estimate (bytes)."""
    from danlab.config import ConfigError
    terms = run_memory_terms(cfg, rows)
    total = sum(t[0] for t in terms)
    avail = available_memory(cfg.device) if available is None else available
    if total > avail:
        size, what, knobs = terms[0]
        values = _knob_values(cfg, rows)
        knob = max(knobs, key=lambda k: values[k] / TYPICAL[k])
        others = [k if k != "batch" or rows == 1 else "batch (× the tuning grid's points)" for k in knobs if k != knob]
        raise ConfigError(f"{knob}: this run would need about {_fmt(total)} of memory, mostly {what}: {_fmt(size)}, "
                          f"and only {_fmt(avail)} is available; lower {knob}"
                          + (f" (or {', '.join(others)})" if others else ""))
    return total


def _fmt(n: float) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def cores() -> int:
    """CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


# below this many state values per cycle (experiments × members × sites) intra-op threads only cost: the
# tensors are too small to split, and under contention (a Dask worker beside others, a busy laptop) every
# parallel region waits for its slowest thread. Measured on 2 cores (docs/results/contention.md): EnKF-N,
# N 20, one experiment, 1 thread vs 2, quiet and beside one busy process.
SMALL_PROBLEM = 1 << 20


def default_threads(cfg, rows: int = 1) -> int:
    """PyTorch intra-op threads for a run whose config leaves `threads` unset: 1 for small problems (every
    standard L96 run: parallelism comes from batching experiments, or from running processes side by side),
    else the cores this process may use."""
    values = cfg.batch * rows * int(cfg.filter.N) * int(cfg.model.Nx)
    if values <= SMALL_PROBLEM and int(cfg.filter.N) <= 256 and int(cfg.model.Nx) <= 4096:
        return 1
    return cores()


def train_memory_terms(cfg) -> list[tuple[int, str, list[str]]]:
    """The main memory terms of a training run (TrainRunConfig): the autograd graph of the N_iter unrolled cycles
    (RK4 stages and the network's activations per cycle) and the validation run, as (bytes, what, knobs)."""
    t, n, Nx = cfg.train, cfg.net, int(cfg.model.Nx)
    per_state = 12 * int(getattr(cfg.model, "substeps", 1)) + 2 * int(n.Nf) * (int(n.Nbl) * int(n.Nl) + 2)  # floats kept per site
    graph = 4 * int(t.Nt) * int(t.N) * Nx * int(t.N_iter) * per_state
    val = 4 * 4 * int(t.val_cycles) * int(t.val_batch) * 8 + 4 * int(t.val_batch) * int(t.N) * Nx * 4 * int(n.Nf)
    stored = 4 * max(int(t.distill_cycles) - int(t.distill_burn_in), 0) * 2 * int(t.Nt) * Nx * (int(t.N) + 4)
    return sorted([(graph, f"the unrolled cycles' autograd graph ({t.Nt} trajectories × N {t.N} × Nx {Nx} × "
                           f"N_iter {t.N_iter} × the network's activations)",
                    ["train.Nt", "train.N", "model.Nx", "train.N_iter", "net.Nf"]),
                   (stored, f"the stored distillation set ({t.distill_cycles} cycles × {2 * t.Nt} trajectories)",
                    ["train.distill_cycles", "train.Nt"]),
                   (val, f"the validation runs ({t.val_batch} × {t.val_cycles} cycles)",
                    ["train.val_cycles", "train.val_batch"])], key=lambda x: -x[0])


TYPICAL_TRAIN = {"train.Nt": 256, "train.N": 1, "model.Nx": 40, "train.N_iter": 10, "net.Nf": 40,
                 "train.val_cycles": 1000, "train.val_batch": 8, "train.distill_cycles": 400}


def check_train_memory(cfg, available: int | None = None) -> int:
    """Like check_run_memory, for a training run."""
    from danlab.config import ConfigError
    terms = train_memory_terms(cfg)
    total = sum(x[0] for x in terms)
    avail = available_memory(cfg.train.device) if available is None else available
    if total > avail:
        size, what, knobs = terms[0]
        t = cfg.train
        values = {"train.Nt": t.Nt, "train.N": t.N, "model.Nx": cfg.model.Nx, "train.N_iter": t.N_iter,
                  "net.Nf": cfg.net.Nf, "train.val_cycles": t.val_cycles, "train.val_batch": t.val_batch,
                  "train.distill_cycles": t.distill_cycles}
        knob = max(knobs, key=lambda k: values[k] / TYPICAL_TRAIN[k])
        raise ConfigError(f"{knob}: this training would need about {_fmt(total)} of memory, mostly {what}: "
                          f"{_fmt(size)}, and only {_fmt(avail)} is available; lower {knob} "
                          f"(or {', '.join(k for k in knobs if k != knob)})")
    return total
