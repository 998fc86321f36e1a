# One-command set-up: `make demo` runs the quickstart, `make test` runs the test suite.
# Both install what they need into .venv first (torch's CPU build first, so pip does not pull CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/slm quickstart

test: install
	$(PY) -m pytest -rs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
