# `make demo` and `make test` each create or refresh the virtual environment, then run.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean mutation

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/danlab reproduce table --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Mutation testing of models/, filters/, nets/, metrics.py, observations.py (mutmut; not part of `make test`).
# mutmut works on a mutated copy in mutants/ (src/ is never written; scripts/mutation.py checks it). On a shared
# 2-core machine a seeded sample keeps it well under an hour: `make mutation MUTATION_SAMPLE=1` runs all.
# Results and the figures of the last run: docs/results/mutation.md.
MUTATION_SAMPLE ?= 0.10
MUTATION_SEED ?= 0
MUTATION_JOBS ?= 1
# a subset of the core, paths under src/danlab (e.g. MUTATION_MODULES="models/ks.py filters/local.py"); empty: all
MUTATION_MODULES ?=
DEV_STAMP := $(VENV)/.installed-dev

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(DEV_STAMP)

mutation: $(DEV_STAMP)
	OMP_NUM_THREADS=1 nice -n 15 $(BIN)/python scripts/mutation.py run --sample $(MUTATION_SAMPLE) --seed $(MUTATION_SEED) --jobs $(MUTATION_JOBS) $(if $(MUTATION_MODULES),--modules $(MUTATION_MODULES))

clean:
	rm -rf $(VENV) runs
