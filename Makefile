# Two entry points: `make demo` and `make test`. Both create .venv when missing and install the
# pinned requirements; the stamp file re-installs only when requirements.txt or pyproject.toml change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest bench clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	@echo "make demo: the end-to-end demo (dense TRADES -> prune -> fine-tune with TSCNC) is not yet available."
	@echo "Until then: python -m benchmarks.penalties (penalty cost) and the README's optax example."

lint: $(STAMP)
	$(BIN)/ruff check .

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.penalties

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
