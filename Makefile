# Two commands on a fresh machine:  make run  (the main job)  and  make test  (the suite).
# Each sets up a local virtual environment first, once (idempotent: re-run only when pyproject.toml or
# constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test lint regression clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on disk, so nothing below can pull a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[cli,tune,plot,peers,wandb,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/moe-lightning $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

regression: $(STAMP)
	$(PY) benchmarks/regression.py

lint: $(STAMP)
	$(VENV)/bin/ruff check moe_lightning tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
