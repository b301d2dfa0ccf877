# Two commands from a clean clone: `make demo` (the whole pipeline on a synthetic dataset) and `make test`.
# Both create ./.venv and install the project into it first (once; again when pyproject.toml changes).
#
# PyTorch: on Linux the package index's default torch is the CUDA build (about 6.4 GB installed, 3.2 GB of it CUDA
# libraries). TORCH=auto (default) installs PyTorch's CPU build (well under 1 GB) first when no NVIDIA GPU is
# visible (no nvidia-smi) and falls back to the default build if that index cannot be reached; TORCH=cpu insists on
# the CPU build; TORCH=default always takes the package index's build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	@if [ "$(TORCH)" = cpu ] || { [ "$(TORCH)" = auto ] && ! command -v nvidia-smi >/dev/null 2>&1; }; then \
	  if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=15)" 2>/dev/null; then \
	    echo "no NVIDIA GPU in use: installing PyTorch's CPU build from $(TORCH_CPU_INDEX) (make TORCH=default to skip)"; \
	    $(BIN)/python -m pip install --index-url $(TORCH_CPU_INDEX) torch torchvision; \
	  elif [ "$(TORCH)" = cpu ]; then echo "$(TORCH_CPU_INDEX) cannot be reached (TORCH=cpu)"; exit 1; \
	  else echo "no NVIDIA GPU in use, but $(TORCH_CPU_INDEX) cannot be reached: installing the default PyTorch build"; \
	  fi; \
	fi
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -c "import torch, torchvision, nnunetv2_hiendmae; print('torch', torch.__version__)"
	touch $@

demo: install
	$(BIN)/nnUNetv2_hiendmae_demo $(DEMO_ARGS)

# two test processes (pytest-xdist), each module's tests in one of them so that its fixtures are built once, the
# longest modules first (tests/conftest.py): the tests' own torch uses one thread and much of the rest is process
# start-up, so two share a 2-core machine well; TEST_WORKERS=0 runs them all in this process
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

test: install
	$(PYTEST)

# the edit loop: every test but those marked slow (real nnU-Net trainings, the demo, torchrun, the GPU rehearsal);
# `make test` runs them all
test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check nnunetv2_hiendmae pretrain benchmarks tests
