# Two commands on a fresh machine: `make serve` and `make test`.
# Each creates the virtual environment and installs on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: serve test bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/microtune serve

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_core.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
