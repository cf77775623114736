# Two commands do everything on a fresh machine (Python 3.11, pip):
#   make train   - set up .venv if missing, then the main job (tiny model, synthetic data, CPU)
#   make test    - set up .venv (with the demo lock) if missing, then the default test suite
#   make demo    - the interactive demo (scripts/demo.py) on the shipped model, CPU
VENV ?= .venv
PY := $(VENV)/bin/python
# pip byte-compiles serially; compileall does the same files on every core: 0.83x the install
# time on 2 cores (benchmarks/benchmark_install.sh, 2026-11-27). The excluded file is 3.12 syntax.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
BYTE_COMPILE := $(PY) -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics' $(VENV)/lib
export WANDB_MODE ?= offline
export OMP_WAIT_POLICY ?= PASSIVE
# pretrained weights and metrics load by hub id and download unless HF_HUB_OFFLINE=1; the tests
# never download (tests/conftest.py also sets it, with empty caches)
TEST_ENV := HF_HUB_OFFLINE=1

.PHONY: setup setup-demo train test test-all eval lint demo

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(BYTE_COMPILE)
	touch $@

# gradio and its pins, resolved together with the core lock (which they leave unchanged)
$(VENV)/.demo-installed: $(VENV)/.installed requirements.txt requirements-demo.txt
	$(PIP_INSTALL) -r requirements.txt -r requirements-demo.txt
	$(BYTE_COMPILE)
	touch $@

setup: $(VENV)/.installed

setup-demo: $(VENV)/.demo-installed

train: setup
	$(PY) train.py $(ARGS)

test: setup-demo
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

test-all: setup-demo
	$(TEST_ENV) $(PY) -m pytest -m "slow or not slow" $(ARGS)

eval: setup
	$(PY) eval.py $(ARGS)

lint: setup
	$(PY) -m ruff check .

demo: setup-demo
	$(PY) scripts/demo.py $(ARGS)
