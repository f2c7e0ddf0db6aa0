# Two commands on a fresh machine:
#   make book   -> installs what it needs, exports the package, executes every chapter, renders _build/html
#   make test   -> installs what it needs (Python packages, Debian's Chromium), checks notebooks and package
#                  agree, builds the book (executing every chapter: their checks are the notebook tests),
#                  then runs pytest, which includes the browser tests of the built site
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test venv export check-sync nbtest pytest chromium clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	touch $(STAMP)

venv: $(STAMP)

export: $(STAMP)
	$(BIN)/nbdev-export

book: export
	$(BIN)/jupyter-book build . -W -n --keep-going
	touch _build/html/.convbook-built
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The notebooks are the source of truth: cleaning and exporting them must not change anything tracked.
check-sync: $(STAMP)
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	git diff --exit-code -- book convbook || { echo "Notebooks and package disagree: run nbdev-clean and nbdev-export, then commit."; exit 1; }
	@test -z "$$(git status --porcelain -- convbook)" || { git status --porcelain -- convbook; echo "nbdev-export created untracked files in convbook/."; exit 1; }

# The chapters as tests without rendering (the book build runs the same cells, in a kernel per chapter).
nbtest: $(STAMP)
	$(BIN)/nbdev-test book --n-workers 1

# The site tests drive Debian's Chromium with playwright (playwright cannot download browsers here).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: check-sync book chromium pytest

clean:
	rm -rf _build .jupyter_cache .pytest_cache .hypothesis
