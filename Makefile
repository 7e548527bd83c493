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

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/mumic demo-data
	$(DAGSTER) job execute -m mumic_dagster.definitions -j retrain_job
	$(DAGSTER) job execute -m mumic_dagster.definitions -j promote_job
	$(BIN)/mumic status

# The Dagster UI with the schedule and sensor daemon.
ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(DAGSTER) dev

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check mumic_ml mumic_dagster tests benchmarks

clean-demo:
	rm -rf data runs models reports .cache .dagster_home mlflow.db mlartifacts
