# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/ncpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/ncpipe
	$(BIN)/ncpipe demo

test: $(BIN)/ncpipe
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
