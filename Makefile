# leukemia-mlops: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
PLOTS_TEMPLATE := dvc_template/offline.html
export PATH := $(BIN):$(PATH)
# Keep libraries quiet and offline: nothing is downloaded at run time.
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1

.DEFAULT_GOAL := help
.PHONY: help setup params data repro compare-seeds test test-fast test-slow lint format ui bench gpu-check clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) $(PLOTS_TEMPLATE) ## Create .venv, install the pinned stack and the plots page template

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# `dvc plots show` page template with vega inlined (offline plots): the libraries come from the
# npm registry at the versions of dvc_template/package-lock.json.
$(PLOTS_TEMPLATE): dvc_template/package.json dvc_template/package-lock.json dvc_template/build_template.py | $(STAMP)
	npm ci --prefix dvc_template --no-audit --no-fund --loglevel=error
	$(BIN)/python dvc_template/build_template.py

params: setup ## Compose conf/ into params.yaml (the config the DVC pipeline runs with)
	lmo-params

data: params ## Write the synthetic C-NMC dataset to data/raw unless data is there
	lmo-synth

repro: data ## Run the whole DVC pipeline (prepare -> sweeps -> training -> evaluate)
	dvc repro

compare-seeds: setup ## Train both models with 3 seeds after make repro: spread, P(CNN > detector) (reports/seeds)
	python -m leukemia_mlops.cli.compare_seeds --seeds 3

test: setup ## Run every test (fast ones, then the slow end-to-end ones, the 15 slowest listed)
	pytest -m "not slow"
	pytest -m slow --durations=15

test-slow: setup ## Run the slow end-to-end tests only
	pytest -m slow --durations=15

test-fast: setup ## Run the fast tests only
	pytest -m "not slow"

lint: setup ## Check style and lint
	ruff check src tests bench hydra_plugins
	ruff format --check src tests bench hydra_plugins

format: setup ## Format the code
	ruff format src tests bench hydra_plugins
	ruff check --fix src tests bench hydra_plugins

ui: setup ## Serve the MLflow UI on 127.0.0.1:5000; prints the experiment's model-training page
	@url=$$(python -m leukemia_mlops.cli.ui_url --mlruns-dir mlruns) && echo "Open $$url"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root ./mlruns/artifacts --host 127.0.0.1 --port 5000 --workers 1

bench: setup ## Run the benchmarks and rewrite BENCHMARKS.md
	python -m bench.run

# On a GPU machine without .venv: the system python3, with the project's sources on the path.
gpu-check: ## GPU smoke list and speed vs the ceiling (8 min on a GPU; BENCHMARKS.md section)
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(if $(wildcard $(BIN)/python),python,python3) -m bench.gpu_check

clean: ## Remove pipeline outputs kept outside git (never data/raw or the committed reports)
	rm -rf data/prepared models outputs multirun
