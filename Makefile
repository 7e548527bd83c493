# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo ui test test-fast lint clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,dev]"
	touch $@

install: $(STAMP)

# The main job on the embedded default: the bundled demo world as the first incoming batch, the whole Dagster
# asset graph (project-local DAGSTER_HOME on SQLite), MLflow on SQLite with local artifacts, CPU.
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DAGSTER := DAGSTER_HOME="$(DAGSTER_HOME)" $(BIN)/dagster
demo: $(STAMP)
	mkdir -p "$(DAGSTER_HOME)"
	$(BIN)/mumic demo-data
	$(DAGSTER) job execute -m mumic_dagster.definitions -j retrain_job
	$(DAGSTER) job execute -m mumic_dagster.definitions -j promote_job
	$(BIN)/mumic status

# The Dagster UI with the schedule and sensor daemon.
ui: $(STAMP)
	mkdir -p "$(DAGSTER_HOME)"
	$(DAGSTER) dev

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check mumic_ml mumic_dagster tests benchmarks

clean-demo:
	rm -rf data runs models reports .cache .dagster_home mlflow.db mlartifacts
