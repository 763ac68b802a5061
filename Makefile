# `make demo`, `make test` and `make docs` do all the set-up on a fresh machine.
# The interpreter: Python >= 3.11 that actually runs, 3.12 preferred.
PYTHON ?= $(shell for p in /root/.pyenv/versions/3.12.1/bin/python3 python3.12 python3.13 python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: venv demo test test-slow docs clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.11 found" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

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

# HTML in docs/_build/html. Warnings are errors (-W; docs/conf.py is nitpicky,
# so every reference must resolve); -E rereads every page: Sphinx does not
# notice a changed docstring, nor repeat the warnings of pages it skips.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -E -q -b html -d docs/_build/doctrees docs docs/_build/html
	@echo "HTML: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) runs docs/_build
