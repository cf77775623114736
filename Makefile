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

# torch 2.14.1 is a CUDA build: the environment takes about 6.9 GB of disk, 7.0 GB with the
# demo's packages. Free space is checked before installing, so a full disk stops setup at once,
# saying so (SKIP_DISK_CHECK=1 skips it).
SETUP_GB ?= 6.9
DEMO_GB ?= 0.2
define CHECK_DISK
@[ -n "$(SKIP_DISK_CHECK)" ] || python3 -c "import pathlib, shutil, sys; \
venv = pathlib.Path('$(VENV)').absolute(); \
free = shutil.disk_usage(next(p for p in (venv, *venv.parents) if p.exists())).free / 1e9; \
sys.exit(f'make: {free:.1f} GB free for $(VENV), this step needs about $(1) GB') if free < $(1) else None"
endef

$(VENV)/.installed: requirements.txt pyproject.toml
	$(call CHECK_DISK,$(SETUP_GB))
	python3 -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(BYTE_COMPILE)
	touch $@

# gradio and its pins, resolved together with the core lock (which they leave unchanged)
$(VENV)/.demo-installed: $(VENV)/.installed requirements.txt requirements-demo.txt
	$(call CHECK_DISK,$(DEMO_GB))
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
