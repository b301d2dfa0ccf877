# Two commands from a clean clone: `make demo` (the whole pipeline on a synthetic dataset) and `make test`.
# Both create ./.venv and install the project into it first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

demo: install
	$(BIN)/nnUNetv2_hiendmae_demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q
