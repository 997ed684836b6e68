# Two commands on a fresh clone: `make demo` (the main job) and `make test` (ruff + pytest).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test lint demo demo-full clean

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

demo: $(VENV)/.installed-demo
	$(BIN)/scm data fetch mnist
	$(BIN)/scm demo --out demo --teacher demo/teacher

demo-full: $(VENV)/.installed-demo
	$(BIN)/scm data fetch mnist
	$(BIN)/scm demo --out demo --full

$(VENV)/.installed-demo: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,demo]"
	touch $@

# The venv: torch only if none is importable there (TORCH_SPEC picks the build), then scm with its dev extra.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
