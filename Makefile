# Two commands on a fresh machine:
#   make book   -> installs what it needs, exports the package, executes every chapter, renders _build/html
#   make test   -> installs what it needs (Python packages, Debian's Chromium), checks notebooks and package
#                  agree, runs every chapter's quick checks with nbdev-test, builds the book (executing
#                  every cell, the slow ones included), then runs pytest, browser tests of the site included
#
# One chapter's checks:   .venv/bin/nbdev-test book/05_backward.ipynb                  (quick cells)
#                         .venv/bin/nbdev-test book/07_emnist.ipynb --flags slow       (every cell)
# All chapters:           make nbtest        (quick)      make nbtest-all   (every cell, no rendering)
# Tests that read the official EMNIST files run when pytest is given the folder
# (PYTEST_ADDOPTS="--emnist-data DIR", or $CONVBOOK_DATA); elsewhere they are skipped with a reason.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test venv export check-sync lint format nbtest nbtest-all pytest chromium bump clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	touch $(STAMP)

venv: $(STAMP)

# The package is exactly what nbdev-export writes from the notebooks (the notebooks' code is in
# ruff's format; nbdev's generated lines, such as __all__, are left as nbdev writes them).
export: $(STAMP)
	$(BIN)/nbdev-export

# Sphinx copies _static only when it rewrites a page: if only a script or style changed since the
# last build, rewrite every page (--all; the executed chapters still come from the cache).
book: export
	@ALL=; if [ -f _build/html/.convbook-built ] && [ -n "$$(find _static _ext -type f -newer _build/html/.convbook-built)" ]; then ALL=--all; fi; \
	$(BIN)/jupyter-book build . -W -n --keep-going $$ALL
	touch _build/html/.convbook-built
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The notebooks are the source of truth: cleaning and exporting them must not change anything tracked.
check-sync: $(STAMP)
	$(BIN)/nbdev-clean
	$(MAKE) --no-print-directory export
	git diff --exit-code -- book convbook || { echo "Notebooks and package disagree: run nbdev-clean and make export, then commit."; exit 1; }
	@test -z "$$(git status --porcelain -- convbook)" || { git status --porcelain -- convbook; echo "nbdev-export created untracked files in convbook/."; exit 1; }

# Workflows validated by actionlint (nothing here can run GitHub's runners); one code style, ruff's, in
# the package and in the notebooks' code cells.
lint: $(STAMP)
	$(BIN)/actionlint .github/workflows/*.yml
	$(BIN)/ruff format --check book scripts _ext tests
	$(BIN)/ruff check book

format: $(STAMP)
	$(BIN)/ruff format book scripts _ext tests
	$(MAKE) --no-print-directory export

# The version's one source is book/00_package.ipynb: `make bump PART=patch` (or minor, major) raises it,
# re-exports the package and opens its section in CHANGELOG.md.
bump: $(STAMP)
	$(BIN)/python scripts/bump_version.py $(PART)

# The chapters as tests without rendering, as nbdev projects run them in CI. Cells flagged `#| slow`
# (training, full benchmarks) are left out here; the book build executes them, so `make test` runs
# every cell once either way. `make nbtest-all` runs them all with nbdev-test.
nbtest: $(STAMP)
	$(BIN)/nbdev-test book --n-workers 1 --timing

nbtest-all: $(STAMP)
	$(BIN)/nbdev-test book --n-workers 1 --flags slow --timing

# The site tests drive Debian's Chromium with playwright (playwright cannot download browsers here);
# $CHROMIUM may name another Chromium binary (CI sets it).
chromium:
	@test -n "$$CHROMIUM" -a -x "$$CHROMIUM" || command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Two worker processes, one test file each at a time (a file's fixtures, such as the browser or the
# Binder environment, are set up once).
pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

test: check-sync lint nbtest book chromium pytest

clean:
	rm -rf _build .jupyter_cache .pytest_cache .hypothesis
