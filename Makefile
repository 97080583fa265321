# TwinCar tasks. `make help` lists them. Every target creates .venv and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint tensorboard clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install TwinCar with the pinned versions in constraints.txt

demo: $(STAMP) ## Train ResNet-50 on the embedded synthetic dataset (offline, about 5 min on 2 CPU cores)
	$(PY) -m twincar.train

test: $(STAMP) ## Run the test suite (about 5 min on 2 CPU cores)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: $(STAMP) ## Run the tests that take seconds (skips the training runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

lint: $(STAMP) ## Check style with ruff
	$(VENV)/bin/ruff check twincar tests scripts

tensorboard: $(STAMP) ## Serve TensorBoard over every run in outputs/
	$(VENV)/bin/tensorboard --logdir outputs

clean: ## Remove run outputs and generated data (keeps .venv)
	rm -rf outputs data/synthetic data/splits
