# Two commands do everything on a fresh machine (Python 3.11, pip):
#   make train   - set up .venv if missing, then the main job (tiny model, synthetic data, CPU)
#   make test    - set up .venv if missing, then the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup train test test-all eval lint

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-all: setup
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

eval: setup
	$(PY) eval.py $(ARGS)

lint: setup
	$(PY) -m ruff check .
