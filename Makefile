# Two commands set everything up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine installs the CPU build of torch from local disk. On a GPU machine, pass a CUDA build, e.g.
#   make run TORCH="torch==2.13.0 --index-url <the PyTorch wheel index for your CUDA version>"
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.runtime-installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

## run: create .venv, install raygpt, run the whole pipeline (raw text -> served model; Ctrl-C stops serving)
RUN_ARGS ?=
run: $(VENV)/.runtime-installed
	$(BIN)/raygpt run $(RUN_ARGS)

## test: create/update .venv with the dev extras, lint, run the whole suite
test: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## bench: tokenize, train and serve benchmarks (ratios against baselines measured in the same run) -> bench/RESULTS.md
BENCH_TOKENIZE_ARGS ?= --copies 11 60
BENCH_TRAIN_ARGS ?= --steps 30
BENCH_SERVE_ARGS ?=
bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench.tokenize $(BENCH_TOKENIZE_ARGS)
	$(BIN)/python -m bench.train $(BENCH_TRAIN_ARGS)
	$(BIN)/python -m bench.serve $(BENCH_SERVE_ARGS)
	$(BIN)/python -m bench.minhash
	$(BIN)/python -m bench.report > /dev/null
	@echo "wrote bench/RESULTS.md"

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
