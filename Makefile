# memsieve: `make run` (the offline demo) and `make test` (the whole suite) set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help venv run demo-data chromium test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project (once)

out/demo-data/shards/00000.tar: | $(STAMP)
	$(BIN)/python -m pipeline.demo_data out/demo-data

demo-data: out/demo-data/shards/00000.tar ## build the demo shards from images shipped in pip packages

run: $(STAMP) demo-data ## run the demo job (jobs/demo.yaml) -> out/demo/
	$(BIN)/memsieve run jobs/demo.yaml

chromium: ## Debian's chromium for the report screenshot test (installed when running as root)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
		echo "chromium is not installed: the report screenshot test will be skipped"

test: $(STAMP) chromium ## the whole test suite (slow benchmarks excluded)
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider

test-all: $(STAMP) chromium ## the suite including slow tests
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format in place
	$(BIN)/ruff format .

bench: $(STAMP) ## benchmarks: read+decode vs a bare loop, tokenizing, probe cost (bench_clip.py, bench_laion.py: see README)
	$(BIN)/python scripts/bench_read.py
	$(BIN)/python scripts/bench_tokenize.py
	$(BIN)/python scripts/bench_probe.py --only tiny

clean: ## remove outputs (keeps .venv)
	rm -rf out
