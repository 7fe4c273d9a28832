# Tiny Transformers, Mighty Performance: `make tour`, `make test`, `make lab`.
# Everything installs into .venv. TORCH picks the PyTorch build (CI pins a CPU build:
# TORCH=torch==2.13.0); the default takes pip's choice for this machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= 'torch>=2.4'
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --quiet
# Test workers (pytest-xdist): one per core, at most 8; each gets cores/workers torch threads
# (tests/conftest.py). JOBS=0 runs the suite in this one process.
JOBS   ?= auto
XDIST   = -n $(JOBS) --maxprocesses=8 --dist worksteal

.PHONY: install tour test test-fast test-browser lab notebooks check-notebooks lint clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[dev]"
	touch $@

$(VENV)/.course: $(VENV)/.core
	$(PIP) -e ".[course,dev]"
	touch $@

install: $(VENV)/.core

tour: $(VENV)/.core
	$(VENV)/bin/llmopt tour

test: $(VENV)/.dev
	$(PY) -m pytest $(XDIST)

test-fast: $(VENV)/.dev  ## everything but the notebook runs and training
	$(PY) -m pytest $(XDIST) -m "not slow"

js/node_modules: js/package-lock.json  ## Transformers.js for the Node example and the web page
	cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund

test-browser: $(VENV)/.dev js/node_modules  ## the web page in headless Chromium (apt-get install chromium)
	$(PY) -m pytest -m browser

lab: $(VENV)/.course
	$(VENV)/bin/jupyter lab notebooks/

notebooks: $(VENV)/.dev
	$(PY) -m llmopt.course

check-notebooks: $(VENV)/.dev
	$(PY) -m llmopt.course --check

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check llmopt tests

clean:
	rm -rf $(VENV) tour_results .pytest_cache build *.egg-info
