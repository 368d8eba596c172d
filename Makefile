# Set-up and the two entry points: `make demo` and `make test`.
#
# The virtual environment is created on first use. A torch that is already installed (a GPU
# machine's CUDA build) is reused through --system-site-packages; otherwise the CPU build is
# installed, pinned so pip does not pull several GB of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hpuopt-installed

.PHONY: demo test test-all bench env clean gpu-check

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "reusing the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -m pip install -q "$(TORCH_CPU_PIN)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	@$(PY) -c "import matplotlib" >/dev/null 2>&1 || $(PY) -m pip install -q matplotlib
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	RUN_SLOW_TESTS=1 $(PY) -m pytest -q

# On a GPU machine: the machine's own python3 and torch, no environment to build, no network.
# DRY_RUN=1 prints the plan without importing torch (CI runs that).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) .ci/gpu_check.py $(if $(DRY_RUN),--dry-run,)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
