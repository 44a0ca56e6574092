# Two commands on a fresh machine: `make serve` and `make test`.
# Each creates the virtual environment and installs on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: serve test bench bench-core bench-nats bench-ceiling bench-ops bench-hygiene bench-quality \
	lint clean

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

bench: bench-core

# one command per benchmark; figures go to bench-results/ (README "Benchmarks")
BENCHMARKS := core nats ceiling ops hygiene quality
$(BENCHMARKS:%=bench-%): bench-%: $(BIN)/.installed
	$(BIN)/microtune bench $*

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
