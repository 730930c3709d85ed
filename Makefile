# Two entry points: `make demo` and `make test`. Both create .venv when missing and install the
# pinned requirements; the stamp file re-installs only when requirements.txt or pyproject.toml change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo data test lint pytest bench clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The demo's data: Debian's dataset-fashion-mnist package when apt can install it (offline-capable
# machines carry it in their package mirror), otherwise tensorflow-datasets downloads the files.
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

demo: $(STAMP) data
	$(BIN)/python -m experiments.demo --workdir=runs/demo

data: $(STAMP)
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist (into $(FMNIST_DIR))"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	    $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "apt could not install dataset-fashion-mnist; trying the tfds download instead"; \
	fi
	$(BIN)/python -m experiments.data fashion_mnist

lint: $(STAMP)
	$(BIN)/ruff check .

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test: lint pytest

# The full benchmark run: tens of minutes on a 2-core CPU, mostly VGG-16 / ResNet-18 TRADES steps;
# tables and JSON in benchmarks/results/run.md. It installs PyTorch and torchattacks (benchmark-
# only, for the twins; torchattacks without its torchvision requirement, which it does not need
# for the attacks used) when missing. `make test` runs the --quick smoke, without either.
bench: $(STAMP)
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@$(BIN)/python -c "import torchattacks" 2>/dev/null || \
	  $(BIN)/python -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m benchmarks.run --out benchmarks/results/run.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
