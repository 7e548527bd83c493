# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo repro ui serve mlflow-ui test test-fast lint clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,services,dev]"
	# Dagster's asset-selection parser needs the ANTLR 4.13 runtime; DVC's hydra-core pins 4.9 but only loads it
	# for `dvc exp` with hydra composition, which this project does not use. See docs/architecture.md.
	$(BIN)/python -m pip install --quiet --no-deps "antlr4-python3-runtime==4.13.2"
	touch $@

install: $(STAMP)

# The main job on the embedded default: the bundled demo world as the first incoming batch, the whole Dagster
# asset graph (project-local DAGSTER_HOME on SQLite), MLflow on SQLite with local artifacts, CPU.
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DAGSTER := DAGSTER_HOME="$(DAGSTER_HOME)" $(BIN)/dagster
$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p "$(DAGSTER_HOME)"
	printf 'telemetry:\n  enabled: false\n' > $@

# The runs go through workspace.yaml's code location, as the UI's do, so `make ui` lists them on the job pages and
# the timeline; each is waited for, and a failed run stops the demo (mumic_dagster/launch.py).
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/mumic demo-data --keep-existing
	DAGSTER_HOME="$(DAGSTER_HOME)" $(BIN)/python -m mumic_dagster.launch -w workspace.yaml retrain_job promote_job
	$(BIN)/mumic status

# The same pipeline as DVC stages. The stages run `mumic`, so the venv's bin goes on PATH: `make repro` works
# without an activated venv. The demo world becomes the first batch only when the incoming folder has none.
repro: $(STAMP)
	$(BIN)/mumic demo-data --keep-existing
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The Dagster UI with the schedule and sensor daemon, on loopback (`make ui PORT=3001` for another port).
ui: PORT ?= 3000
ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(DAGSTER) dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

# The project's MLflow store unless MLFLOW_TRACKING_URI is set. MLflow starts `uvicorn` by name, so the venv's bin
# goes first on PATH: these targets work without an activated venv. `make serve PORT=5002`, `make mlflow-ui PORT=5005`.
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
MLFLOW_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)"

# The champion on loopback; it reads no server paths unless MUMIC_IMAGE_ROOT is set (see mumic_ml/pipeline/registry.py).
serve: PORT ?= 5001
serve: $(STAMP)
	$(MLFLOW_ENV) $(BIN)/mlflow models serve -h 127.0.0.1 -p $(PORT) -m models:/mumic@champion --env-manager local

# The MLflow UI in one worker and without MLflow's job runner (GenAI scoring jobs, unused here): by default it
# starts four workers and eight job processes, ~0.3 GB each.
MLFLOW_UI_WORKERS ?= 1
MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
mlflow-ui: PORT ?= 5000
mlflow-ui: $(STAMP)
	$(MLFLOW_ENV) MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(MLFLOW_SERVER_ENABLE_JOB_EXECUTION) \
		$(BIN)/mlflow ui -h 127.0.0.1 -p $(PORT) --workers $(MLFLOW_UI_WORKERS) --backend-store-uri "$(MLFLOW_TRACKING_URI)"

# Two workers, each taking whole test files, so a module's shared fixture (a trained project) is built once.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check mumic_ml mumic_dagster tests benchmarks

clean-demo:
	rm -rf data runs models reports .cache .dagster_home mlflow.db mlartifacts
