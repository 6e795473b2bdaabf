# Two entry points: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean sandbox

# The code verifier runs programs only inside bubblewrap (scope_jax/verifiers/code.py). Installed
# here when missing and we are root (CI); otherwise say how, and stop.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq bubblewrap; \
	  else \
	    echo "bubblewrap (bwrap) is missing: sudo apt-get install -y bubblewrap" >&2; exit 1; \
	  fi; }

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: $(VENV)/.installed sandbox
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

demo: $(VENV)/.installed
	$(PY) -m tools.demo

bench: $(VENV)/.installed
	$(PY) -m tools.bench_losses

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
