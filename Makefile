# Two entry points: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) -m tools.demo

bench: $(VENV)/.installed
	$(PY) -m tools.bench_losses

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
