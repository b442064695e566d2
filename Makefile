# Two commands do all the set-up: `make run` (the default pipeline) and `make test` (the test suite).
# Both are idempotent: a second call reuses the virtual environment, the data and DVC's cache.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
# dvc.yaml's `python -m stages.<name>` must find the venv's python
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: run test install constraints data flow dag metrics times promote push services services-stop postgres

run: install data ## the whole DAG with params.yaml, then where its time went
	$(BIN)/dvc repro
	$(BIN)/python -m stages.times

test: install data postgres ## the test suite (unit tests + an end-to-end smoke run of the DAG)
	$(BIN)/python -m pytest -q --durations=15

flow: install data ## the same DAG as a Prefect flow (offline, temporary local server)
	$(BIN)/python -m flows.pipeline

install: $(VENV)/.installed

# The venv ends near 7 GB (PyPI's torch is the CUDA build); a disk that fills mid-install leaves a broken venv and pip's
# "[Errno 28] No space left on device" deep in its log, so say it first, counting what the venv already holds.
VENV_GB ?= 7

$(VENV)/.installed: pyproject.toml constraints.txt
	@have_kb=$$(du -sk $(VENV) 2>/dev/null | cut -f1); \
	free_kb=$$(df -Pk . | awk 'NR == 2 {print $$4}'); \
	need_kb=$$(( $(VENV_GB) * 1048576 - $${have_kb:-0} )); \
	if [ "$$free_kb" -lt "$$need_kb" ]; then \
		echo "make install: the virtual environment needs about $$(( need_kb / 1048576 + 1 )) GB more disk, only $$(( free_kb / 1048576 )) GB is free under $(CURDIR); free some space (df -h) and run it again" >&2; \
		exit 1; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# constraints.txt pins every library to the versions the committed results were made with; this re-resolves them
# from pyproject.toml's ranges (newest that fit) and writes the new pins: commit them with the run that used them.
constraints: install
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	touch $(VENV)/.installed

# Fashion-MNIST from Debian's package where apt-get exists; elsewhere the prepare stage downloads it.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

dag: install
	$(BIN)/dvc dag

metrics: install
	$(BIN)/dvc metrics show

times: install ## the last run's minutes per stage (MLflow run times), precision, Inception images
	$(BIN)/python -m stages.times

promote: install ## move the registered generator's `champion` alias to the latest version if its FID is better
	$(BIN)/python -m stages.promote

push: install ## outputs, run records and every file they name to the DVC remote (docs/team.md)
	$(BIN)/python -m stages.push_runs

# The team set-up (docs/team.md): PostgreSQL, an MLflow server on it serving the artifacts, a Prefect server on it, all
# on 127.0.0.1 (ports, folders, login: services/config.env). Then: eval "$(services/services.sh env)"
services: install postgres
	services/services.sh start

services-stop:
	services/services.sh stop

# Debian's PostgreSQL 15 where apt-get exists (the team services and their tests need it)
postgres:
	@if ! command -v pg_createcluster >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi
