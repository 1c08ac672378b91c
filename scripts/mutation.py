"""`make mutation`: mutation testing of the numerical core with mutmut, and its kill rate per module.

    python scripts/mutation.py run [--sample F] [--seed S] [--jobs J] [--modules M ...]   # mutate, test, summarise
    python scripts/mutation.py summary                                 # the last run's kill rates again

mutmut (configured in pyproject.toml, [tool.mutmut]) copies src/ into mutants/ and mutates the copy; src/ is
never written, which this script checks (git status of src/ before and after). Each mutant runs only the tests
of the configured selection that executed its function. `--sample F` draws a seeded fraction F of the mutants
of each module (the same draw for the same source and seed), so that a run fits in well under an hour on a
shared 2-core machine; 1 (the default) runs them all. Kill rate = (killed + timeout) / (mutants tested - those
listed in EQUIVALENT below, each with the reason it cannot be killed by any test).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what [tool.mutmut] only_mutate names (the package's __init__ files hold no code to mutate)
MODULES = sorted(str(p.relative_to(ROOT)) for d in ("models", "filters", "nets") for p in (ROOT / "src/danlab" / d).glob("*.py")
                 if p.name != "__init__.py") + ["src/danlab/metrics.py", "src/danlab/observations.py"]

# Mutants that no test can kill because they do not change behaviour (name -> reason). Keep them short and
# justified: each one was read, not guessed. See docs/results/mutation.md.
_DIM = "the dimension -1 written +1 on a tensor with two dimensions (or unsqueeze of a (B, 1) tensor): the same axis"
_CPU = "device argument dropped: the same tensor on a CPU; only a run on a GPU would tell (none on the test machines)"
EQUIVALENT: dict[str, str] = {
    "danlab.filters.ensemble.x_dual_inflation__mutmut_1": "max_iter 40 -> 41: the Newton iterations stop on tol long before",
    "danlab.filters.ensemble.x_dual_inflation__mutmut_24": _DIM,
    "danlab.filters.ensemble.xǁEnKF_Nǁupdate__mutmut_86": _DIM,
    "danlab.filters.variational.xǁVar4Dǁwindow_analysis__mutmut_133": _DIM,
    "danlab.models.linear.xǁLinearModelǁspinup__mutmut_1": "default of an unused argument (a linear model needs no spin-up)",
    "danlab.filters.base.x_safe_eigh__mutmut_32": "the all-rows-finite fast path skipped: torch.where then returns G itself",
    "danlab.filters.variational.x_observation_jacobian__mutmut_42": "dtype of the identity seeding the adjoint dropped: 0 and 1 are exact in any dtype",
    "danlab.filters.variational.xǁVar4Dǁprepare__mutmut_8": "dtype of the differentiability probe dropped: it differentiates all the same",
    "danlab.observations.xǁObserverǁobserve__mutmut_15": _CPU,
    "danlab.filters.ensemble.xǁEnKFǁupdate__mutmut_48": _CPU,
    "danlab.filters.base.x_safe_eigh__mutmut_9": _CPU,
    "danlab.filters.variational.xǁVar4Dǁprepare__mutmut_9": _CPU,
    "danlab.filters.iterative.xǁIEnKSǁwindow_analysis__mutmut_176": _CPU,
    "danlab.filters.local.x_periodic_distances__mutmut_5": _CPU,
    "danlab.models.ks.x_etdrk4_coefficients__mutmut_1": "contour points 32 -> 33: the trapezoidal contour integral has "
                                                       "converged to round-off at both",
    "danlab.models.ks.xǁKuramotoSivashinskyǁ_nonlinear__mutmut_6": "irfft length dropped: Nx is even (refused "
                                                                   "otherwise), so the default 2 (Nx/2 + 1 - 1) is Nx",
    "danlab.models.sht.xǁSHTǁ_legendre_synthesis__mutmut_12": "einsum subscripts upper-cased: the same contraction",
    "danlab.models.sht.xǁSHTǁ_legendre_synthesis__mutmut_18": "irfft dim=-1 dropped: -1 is the default",
    "danlab.models.qg_sphere.xǁQGSphereǁspinup__mutmut_1": "default time 50 -> 51 days: max(time, 100) runs 100 either way",
    "danlab.models.qg_sphere.xǁQGSphereǁdistances__mutmut_18": "upper clamp of the cosine dropped: on the Gaussian grids "
                                                               "it never exceeds 1 (measured at T10 and T21: max 1 exactly)",
    "danlab.models.qg_sphere.xǁQGSphereǁtendency__mutmut_15": _CPU,
    "danlab.models.qg_sphere.xǁQGSphereǁtendency__mutmut_78": _CPU,
    "danlab.models.qg_sphere.xǁQGSphereǁenergy_spectrum__mutmut_21": _CPU,
    "danlab.nets.sphere.xǁSphereNetǁfeatures__mutmut_52": "the latitude buffer's cast to E's dtype dropped: the buffer "
                                                          "follows the module's dtype, which E must have for the convolutions",
}

KILLED = {1, 3, 24, -24, 152, 255, 36}  # a failing test run, or a timeout (SIGXCPU): the mutant was detected
STATUS = {0: "survived", 33: "no tests", 5: "no tests", None: "not run"}


def mutant_names(path: str) -> list[str]:
    """The names mutmut gives the mutants of one source file (the same as its run creates)."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    code = (ROOT / path).read_text()
    return [get_mutant_name(Path(path), n) for n in mutate_file_contents(path, code).mutant_names]


def sample(fraction: float, seed: int, modules: list[str] = MODULES) -> list[str]:
    chosen = []
    for path in modules:
        names = mutant_names(path)
        if fraction >= 1:
            chosen += names
        else:
            k = max(1, round(fraction * len(names))) if names else 0
            chosen += sorted(random.Random(f"{seed}/{path}").sample(names, k))
    return chosen


def git_src_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True).stdout


def results(modules: list[str] = MODULES) -> dict[str, dict[str, int | None]]:
    out = {}
    for path in modules:
        meta = ROOT / "mutants" / (path + ".meta")
        out[path] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return out


def summary(names: list[str] | None = None, modules: list[str] = MODULES) -> str:
    """Markdown table of the kill rate per module (restricted to `names` when given)."""
    wanted = set(names) if names else None
    rows, tot = [], Counter()
    for path, codes in results(modules).items():
        c = Counter()
        for name, code in codes.items():
            if wanted is not None and name not in wanted:
                continue
            if name in EQUIVALENT:
                c["equivalent"] += 1
            elif code in KILLED:
                c["killed"] += 1
            else:
                c[STATUS.get(code, "other")] += 1
        tested = c["killed"] + c["survived"] + c["no tests"] + c["other"]
        tot.update(c)
        rate = f"{100 * c['killed'] / tested:.0f} %" if tested else "—"
        rows.append(f"| {path.removeprefix('src/danlab/')} | {tested} | {c['killed']} | {c['survived']} | "
                    f"{c['no tests']} | {c['equivalent']} | {rate} |")
    tested = tot["killed"] + tot["survived"] + tot["no tests"] + tot["other"]
    rate = f"{100 * tot['killed'] / tested:.1f} %" if tested else "—"
    head = ("| module | mutants | killed | survived | no test | equivalent (excluded) | kill rate |\n"
            "|---|---|---|---|---|---|---|")
    foot = (f"| **total** | {tested} | {tot['killed']} | {tot['survived']} | {tot['no tests']} | "
            f"{tot['equivalent']} | **{rate}** |")
    if tot["not run"]:
        foot += f"\n\n{tot['not run']} mutants of the selection not run (interrupted)."
    return "\n".join([head, *rows, foot])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "summary", "list"])
    ap.add_argument("--sample", type=float, default=1.0, help="fraction of each module's mutants (1: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (mutmut --max-children)")
    ap.add_argument("--modules", nargs="+", metavar="M", help="only these modules, as paths under src/danlab "
                    "(e.g. models/ks.py filters/local.py); default: all of the numerical core")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    modules = MODULES
    if a.modules:
        modules = [f"src/danlab/{m.removeprefix('src/danlab/')}" for m in a.modules]
        unknown = sorted(set(modules) - set(MODULES))
        if unknown:
            ap.error(f"--modules: not in the mutated core: {', '.join(unknown)} (choose among "
                     f"{', '.join(m.removeprefix('src/danlab/') for m in MODULES)})")
    names = sample(a.sample, a.seed, modules) if a.sample < 1 or a.modules else None
    if a.command == "list":
        print("\n".join(names or sample(1.0, 0)))
        return 0
    if a.command == "run":
        before = git_src_state()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(a.jobs), *(names or [])]
        rc = subprocess.run(cmd, env=env).returncode
        if git_src_state() != before:
            print("mutation: src/ changed during the run; it must not", file=sys.stderr)
            return 1
        if rc:
            print(f"mutation: mutmut exited {rc}", file=sys.stderr)
    label = f"a seeded sample ({a.sample:g} of each module's mutants, seed {a.seed})" if names else "all mutants"
    print(f"\nKill rate, {label}:\n")
    print(summary(names, modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
