# Two entry points a new user tries first. Both create (or reuse) .venv in the repo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch; GPU users: install your CUDA build of torch into .venv first, then run make.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install install-dev quickstart test test-gpu clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	HF_HUB_OFFLINE=1 $(PY) -m launch.quickstart

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu" -n 2 --timeout 900 tests

test-gpu: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu tests

clean:
	rm -rf runs .pytest_cache
