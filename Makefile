# Two entry points (see README): `make run` and `make test`. Both build .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this machine has its CPU wheel; an unpinned torch pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	@echo "report: reports/report.md   runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) data outputs
