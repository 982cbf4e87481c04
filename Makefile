# The two set-up commands of the README. Each creates/updates .venv itself.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || (ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n1))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || (echo "Python 3.12 not found: install it or pass PYTHON=/path/to/python3.12" && exit 1)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,video]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m wanjax.demo

test: $(STAMP)
	JAX_PLATFORMS=cpu OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build dist *.egg-info
