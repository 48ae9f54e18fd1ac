# Two commands do everything on a fresh clone:
#   make run    set up .venv (first time) and run the main job: the probing table of Table 1
#   make test   set up .venv (first time) and run the fast test suite (every notebook included, small sizes)
#   make wheel  build dist/sdattn_lab-<version>-py3-none-any.whl (code, configs, models, data; docs/install.md)
# Pass other overrides with ARGS, e.g. make run ARGS="probe=self_attn".

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FLOORS ?= .venv-floors
ARGS   ?= probe=cross_attn
export HF_HUB_OFFLINE ?= 1

.PHONY: run test test-floors test-slow test-app setup lint bench wheel

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0          # first and pinned: the CPU wheel, never a CUDA upgrade
	$(PY) -m pip install -e '.[dev,app,browser]'   # app, browser: the explorer and its browser test
	touch $@

setup: $(VENV)/.installed

# A second venv with every dependency at its declared floor (constraints/minimum.txt); torch stays 2.13.0.
$(FLOORS)/.installed: pyproject.toml constraints/minimum.txt
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install torch==2.13.0
	$(FLOORS)/bin/python -m pip install -c constraints/minimum.txt -e '.[dev]'
	touch $@

run: setup
	$(PY) -m experiments.run $(ARGS)

# The fast suite on every core (pytest-xdist; each test runs one torch thread): ~8 min on 2 cores.
test: setup
	$(PY) -m pytest -n auto

test-floors: $(FLOORS)/.installed
	$(FLOORS)/bin/python -m pytest -n auto

test-app: setup   # the attention explorer: adapter, served API, one real browser (system chromium)
	$(PY) -m pytest tests/test_app_backend.py tests/test_app_server.py

test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m experiments.perf all

wheel: setup
	$(PY) -m pip wheel --no-deps -w dist .
