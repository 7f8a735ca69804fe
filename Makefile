# Two commands for a new user: `make demo` and `make test`.
# Each creates .venv when it is missing and installs the project into it; the install is
# skipped when pyproject.toml and constraints.txt have not changed since the last one.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

demo: $(STAMP)
	$(VENV)/bin/freezeray demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,demo]' --config-settings editable_mode=compat
	touch $(STAMP)
