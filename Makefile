# Two commands on a fresh clone: `make demo` (the main job) and `make test` (ruff + pytest).
# `make demo` writes to runs/demo (ignored by git); `make demo-publish` copies its report over the committed one.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test test-browser lint demo demo-text demo-full demo-publish clean

test: $(VENV)/.installed
	command -v espeak-ng >/dev/null || apt-get install -y -q espeak-ng || sudo apt-get install -y -q espeak-ng
	$(BIN)/ruff check .
	$(BIN)/pytest

# The page of `scm serve` in a real browser: headless Chromium (Debian's package) driven by Playwright for Python
# (launched with the system browser, so nothing is downloaded from a browser CDN). Installs what is missing.
test-browser: $(VENV)/.installed
	command -v chromium >/dev/null || apt-get install -y -q chromium || sudo apt-get install -y -q chromium
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/pip install --quiet "playwright>=1.40"
	$(BIN)/pytest -q tests/test_serve_browser.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

demo: $(VENV)/.installed-demo
	$(BIN)/scm data fetch mnist
	$(BIN)/scm demo --out runs/demo --teacher demo/teacher

# Text to image: captioned MNIST, the committed text-conditioned teacher (demo/text-teacher), its 2-step sCD student.
demo-text: $(VENV)/.installed-demo
	$(BIN)/scm data fetch mnist
	$(BIN)/scm demo --text --out runs/demo-text --teacher demo/text-teacher

demo-full: $(VENV)/.installed-demo
	$(BIN)/scm data fetch mnist
	$(BIN)/scm demo --out runs/demo-full --full

# Deliberately replace the committed report (demo/report.md, report.html, results.json, grids, loss curves).
demo-publish:
	@test -f runs/demo/report.md || { echo "no runs/demo/report.md: run make demo first"; exit 1; }
	cp runs/demo/report.md runs/demo/report.html runs/demo/results.json runs/demo/*.png demo/

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
