# `make demo` and `make test` do all the set-up on a fresh machine.
# The interpreter: Python >= 3.11 that actually runs, 3.12 preferred.
PYTHON ?= $(shell for p in /root/.pyenv/versions/3.12.1/bin/python3 python3.12 python3.13 python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.11 found" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optax-shapley demo

# pytest-xdist: TEST_WORKERS processes (the same tests, split between them;
# tests sharing a trained module fixture stay together, see tests/conftest.py).
# PYTEST_ARGS: more pytest options, e.g. PYTEST_ARGS=--durations=20.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# The end-to-end checks marked slow (multi-process runs of the examples).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
