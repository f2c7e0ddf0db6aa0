# Two commands on a fresh machine:
#   make book   -> installs what it needs, exports the package, executes every chapter, renders _build/html
#   make test   -> installs what it needs, checks notebooks and package agree, runs nbdev-test, then pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test venv export check-sync nbtest pytest clean

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
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The notebooks are the source of truth: cleaning and exporting them must not change anything tracked.
check-sync: $(STAMP)
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	git diff --exit-code -- book convbook || { echo "Notebooks and package disagree: run nbdev-clean and nbdev-export, then commit."; exit 1; }
	@test -z "$$(git status --porcelain -- convbook)" || { git status --porcelain -- convbook; echo "nbdev-export created untracked files in convbook/."; exit 1; }

nbtest: $(STAMP)
	$(BIN)/nbdev-test book --n-workers 1

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: check-sync nbtest pytest

clean:
	rm -rf _build .jupyter_cache .pytest_cache .hypothesis
