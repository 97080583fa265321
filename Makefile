# TwinCar tasks. `make help` lists them. Every target creates .venv and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install browser demo docs test test-fast lint tensorboard clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -c constraints.txt -e '.[all]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install TwinCar and every extra (onnx, demo, cluster, search, docs) with the pinned versions

browser: ## Install headless Chromium and its driver for the demo's browser test (Debian; needs root)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing and cannot apt-get install them: the browser test will be skipped"; fi

demo: $(STAMP) ## Train ResNet-50 on the embedded synthetic dataset (offline, about 5.5 min on 2 CPU cores)
	$(PY) -m twincar.train

docs: $(STAMP) ## Build the documentation strictly (a broken link or a page missing from the nav fails)
	$(VENV)/bin/mkdocs build --strict --site-dir site

test: $(STAMP) browser docs ## Run the test suite and build the docs (about 13 min on 2 CPU cores from a fresh clone, two pytest workers; installs chromium for the demo test)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile

test-fast: $(STAMP) ## Run the tests that take seconds (trains nothing; about 75 s on 2 CPU cores)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile -m "not slow"

lint: $(STAMP) ## Check style with ruff
	$(VENV)/bin/ruff check twincar tests scripts

tensorboard: $(STAMP) ## Serve TensorBoard over every run in outputs/
	$(VENV)/bin/tensorboard --logdir outputs

clean: ## Remove run outputs and generated data (keeps .venv)
	rm -rf outputs data/synthetic data/splits
