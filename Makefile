# Three commands for a new user: `make demo`, `make test` and `make lint` (`make test-fast`
# is the inner loop; `make bench-smoke` runs every benchmark at a tiny size, and CI runs it
# after `make test`). Each creates .venv when it is missing and installs the project into
# it; the install is skipped when pyproject.toml and constraints.txt have not changed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST := $(VENV)/bin/python -m pytest -q --durations=25

.PHONY: demo test test-fast bench-smoke lint

demo: $(STAMP)
	$(VENV)/bin/freezeray demo

test: $(STAMP)
	$(PYTEST) -m "not benchmark"

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not benchmark"

bench-smoke: $(STAMP)
	$(PYTEST) -m benchmark

lint: $(STAMP)
	$(VENV)/bin/ruff check freezeray surgery pipeline jobs benchmarks tests
	$(VENV)/bin/mypy freezeray surgery

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,demo,lint,onnx]' --config-settings editable_mode=compat
	touch $(STAMP)
