# The two set-up commands of the README. Each creates/updates .venv itself, installing only what it needs:
#   make demo   core dependencies only (`pip install -e .`: jax, flax, pillow, imageio, ...; no torch)
#   make test   core + the extras of the test suite (`pip install -e ".[test]"`: torch, diffusers, transformers, ...)
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || (ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n1))
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv venv-core clean

$(CORE_STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || (echo "Python 3.12 not found: install it or pass PYTHON=/path/to/python3.12" && exit 1)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e .
	@touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(PIP) -e ".[test]"
	@touch $(STAMP)

venv-core: $(CORE_STAMP)

venv: $(STAMP)

demo: $(CORE_STAMP)
	$(PY) -m wanjax.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	JAX_PLATFORMS=cpu OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build dist *.egg-info
