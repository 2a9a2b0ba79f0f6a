# Two entry points (see README): `make run` and `make test`. Both build .venv first, installing
# the exact versions of requirements.lock (pyproject.toml keeps ranges for library users).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LOCK    := requirements.lock

export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test test-fast lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	# torch first and pinned: this machine has its CPU wheel; an unpinned torch pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	@echo "report: reports/report.md   runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# After adding or upgrading a dependency with .venv/bin/pip (and pyproject.toml's ranges), rewrite
# the lock from what is installed (torch without its local "+cpu" label, which the lock's == matches).
lock:
	$(BIN)/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f > $(LOCK)

clean:
	rm -rf $(VENV) data outputs
