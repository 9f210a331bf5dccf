# Two entry points that do all set-up on a fresh machine:
#   make dev    the embedded stack (SeaweedFS + hub + worker pools) with a demo upload
#   make test   lint and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: dev test install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

dev: install
	$(BIN)/bucketwire dev --demo

# ruff lints the project's own directories, not whatever else is in the checkout (a newcomer's my_counter.py
# beside .bucketwire-dev, where the README's plugin is run from)
test: install
	$(BIN)/ruff check framework plugins tests examples .ci
	$(BIN)/mypy
	$(BIN)/python .ci/suite.py -q

bench: install
	$(BIN)/bucketwire bench bus

clean:
	rm -rf $(VENV) state .pytest_cache
