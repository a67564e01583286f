# The two commands of the README: `make serve` and `make test`.
# Another interpreter: `make test PYTHON=python3.12` (3.10 or newer).
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(BIN)/vllm-emulator

.PHONY: setup compiled serve test test-slow bench clean

# The set-up runs under a lock (flock, where the system has it): `make serve` and `make test`
# started together on a fresh clone would otherwise both build the same .venv. The second one
# waits, then finds the set-up done.
#
# The compiled core (emulator/_compiled.py) is optional: where Cython cannot be installed, the set-up goes on
# without it, and compile_core says in one line when it cannot compile.
ifdef VENV_LOCKED
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,compiled]' || $(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m vllm_emulator.compile_core
	touch $@
else
$(STAMP): pyproject.toml
	mkdir -p $(VENV)
	$(shell command -v flock >/dev/null && echo flock $(VENV)/.setup.lock) $(MAKE) --no-print-directory VENV_LOCKED=1 $@
endif

setup: $(STAMP)

# Compile the core's hot modules again (after editing them: until then an edited module runs as plain Python).
compiled: setup
	$(BIN)/python -m vllm_emulator.compile_core

serve: setup
	$(BIN)/vllm-emulator serve

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build/compiled
