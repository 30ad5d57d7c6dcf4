# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: train test bench results install browser postgres clean

# The stamp is rebuilt when pyproject.toml changes, so a fresh clone or a new dependency reinstalls.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/distnet train $(CONFIG)

# The MLflow UI test drives Debian's chromium + chromedriver: installed here where apt-get can (CI
# runs as root on Debian); elsewhere that one test is skipped.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "make: no chromium; the MLflow UI browser test will be skipped"

# tests/test_postgres.py runs a real PostgreSQL (Debian's package; CI runs as root on Debian).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "make: no PostgreSQL; tests/test_postgres.py will fail"

test: install browser postgres
	$(BIN)/python -m pytest -q tests

# Benchmarks print markdown tables; docs/benchmarks.md keeps the results with the machine.
bench: install
	PYTHONPATH=benchmarks $(BIN)/python benchmarks/bench.py --reps 3

# The experiments of docs/results.md: each a sweep config, then its report (reports/<name>/). On a
# 2-core CPU about 25 minutes in all (sweeps: 36 s, 165 s, 133 s, 318 s, 638 s); each can run alone.
EXPERIMENTS := nielsen_speed_init nielsen_speed_training nielsen_depth init_depth glorot_bengio
results: $(addprefix results-,$(EXPERIMENTS))

# One experiment, one command: `make results-nielsen_depth` (its sweep, then its report).
results-%: install
	$(BIN)/distnet sweep configs/$*.yaml
	$(BIN)/distnet report $*

clean:
	rm -rf $(VENV) mlruns mlartifacts mlruns.db distnet_runs
