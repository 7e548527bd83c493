# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast lint clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

# The main job on the embedded default: bundled demo world, local files, CPU.
demo: $(STAMP)
	$(BIN)/mumic demo-data
	$(BIN)/mumic ingest --manifest data/raw/demo/manifest.csv --images-root data/raw/demo \
		--taxonomy data/raw/demo/taxonomy.yaml --out data/ingested
	$(BIN)/mumic split --taxonomy data/raw/demo/taxonomy.yaml
	$(BIN)/mumic train
	$(BIN)/mumic evaluate

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check mumic_ml mumic_dagster tests benchmarks

clean-demo:
	rm -rf data runs models reports .cache
