# Two commands on a fresh machine:  make run  (the main job)  and  make test  (the suite).
# Each sets up a local virtual environment first, once (idempotent: re-run only when pyproject.toml or
# constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time: most tests
# are one single-threaded process (a CLI subprocess, a tiny model), so two keep two cores busy. 1: in this
# process, no xdist.
TEST_WORKERS ?= 2

.PHONY: install run test lint regression clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, the CPU build, so nothing below can pull a CUDA build: the torch pip finds when it is a
	# CPU build (this kind of machine's wheel on disk), else the same version from PyTorch's CPU wheel index
	$(PY) -m pip install -q --dry-run --no-deps --ignore-installed --report $(VENV)/torch.json -c constraints.txt torch
	if $(PY) -c "import json, sys; m = json.load(open('$(VENV)/torch.json'))['install'][0]['metadata']; \
	             sys.exit(any('nvidia' in d for d in m.get('requires_dist') or []))"; then \
	  $(PY) -m pip install -q -c constraints.txt torch; \
	else \
	  $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu \
	    "torch==$$(sed -n 's/^torch==//p' constraints.txt)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[cli,tune,postgres,launchers,mistral,plot,peers,wandb,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/moe-lightning $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

regression: $(STAMP)
	$(PY) benchmarks/regression.py

lint: $(STAMP)
	$(VENV)/bin/ruff check moe_lightning tests benchmarks

# Everything the main job and the tests leave: the environment, run folders, the default study databases
# (results/studies/, tuner.storage's home when unset), the tiny models' cache when it lives here, caches.
clean:
	rm -rf $(VENV) runs outputs multirun wandb results/studies .cache .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
