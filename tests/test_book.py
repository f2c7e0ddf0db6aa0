"""The book's sources: every chapter in the table of contents exists, is clean, ends with exercises,
and renders without nbdev directives."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_ext"))
from nbdev_directives import strip_directives  # noqa: E402

TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _toc_files(entries) -> list[str]:
    out = []
    for e in entries or []:
        out += [e["file"], *_toc_files(e.get("sections"))]
    return out


ALL_PAGES = [TOC["root"]] + [f for part in TOC.get("parts", [TOC]) for f in _toc_files(part.get("chapters"))]
PAGES = [p for p in ALL_PAGES if (ROOT / f"{p}.ipynb").exists()]  # the notebooks
CHAPTERS = [p for p in PAGES if p != TOC["root"]]
DIRECTIVE = re.compile(r"^\s*#\s*\|", re.M)


def load(page: str) -> dict:
    return json.loads((ROOT / f"{page}.ipynb").read_text())


def source(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


@pytest.mark.parametrize("page", PAGES)
def test_page_exists_and_is_clean(page):
    nb = load(page)
    for cell in nb["cells"]:
        assert not cell.get("outputs"), f"{page}: committed outputs (run nbdev-clean)"
        assert cell.get("execution_count") is None


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_has_title_summary_and_exercises(page):
    cells = load(page)["cells"]
    md = [source(c) for c in cells if c["cell_type"] == "markdown"]
    assert md[0].startswith("# "), f"{page}: first markdown cell must be the title"
    assert "\n> " in md[0], f"{page}: title cell needs a '> summary' line (the module docstring)"
    text = "\n".join(md)
    assert "## Exercises" in text
    labels = re.findall(r"```\{exercise(?:-start)?\}[^\n]*\n:label: (\S+)", text)
    assert labels, f"{page}: no exercises"
    for label in labels:
        assert f"{{solution-start}} {label}" in text, f"{page}: exercise {label} has no solution"
    assert text.count("{solution-start}") == text.count("{solution-end}")
    assert text.count("{exercise-start}") == text.count("{exercise-end}")


@pytest.mark.parametrize("page", PAGES)
def test_rendered_notebook_has_no_directives(page):
    nb = strip_directives(load(page))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            tags = cell.get("metadata", {}).get("tags", [])
            assert "remove-cell" in tags or not DIRECTIVE.search(source(cell)), source(cell)[:80]


def test_strip_directives_on_a_sample():
    nb = {"cells": [
        {"cell_type": "code", "metadata": {}, "source": "#| default_exp conv"},
        {"cell_type": "code", "metadata": {}, "source": ["#| export\n", "def f():\n", "    return 1\n"]},
        {"cell_type": "code", "metadata": {}, "source": "#| hide\nimport os"},
        {"cell_type": "code", "metadata": {"nbdev": {"hide": True}}, "source": "x = 1"},
        {"cell_type": "code", "metadata": {}, "source": "x = 2  #| not a directive"},
        {"cell_type": "markdown", "metadata": {}, "source": "#| stays in markdown"},
    ]}
    cells = strip_directives(nb)["cells"]
    tags = [c["metadata"].get("tags", []) for c in cells]
    assert tags[0] == ["remove-cell"] and tags[2] == ["remove-cell"] and tags[3] == ["remove-cell"]
    assert cells[1]["source"] == "def f():\n    return 1\n" and tags[1] == []
    assert cells[4]["source"] == "x = 2  #| not a directive" and tags[4] == []
    assert cells[5]["source"] == "#| stays in markdown"


INSTALL_CELL = "# Outside this repository (Colab, a bare Binder), install what this chapter needs."
LOCAL_PATH = re.compile(r"(\.\./shared|/work/|/tmp/|/root/|_build/)")


@pytest.mark.parametrize("page", PAGES)
def test_notebook_runs_outside_this_checkout(page):
    """Colab and Binder open a single notebook: its first code cells install what is missing, and no
    cell refers to a path that only exists in this checkout or on the machine that built the book."""
    code = [c for c in load(page)["cells"] if c["cell_type"] == "code"]
    if not code:  # a page of prose (the landing page) needs nothing
        return
    install = next((c for c in code[:3] if INSTALL_CELL in source(c)), None)
    assert install is not None, f"{page}: no install cell among the first code cells"
    assert re.match(r"\s*#\|\s*hide", source(install)), f"{page}: the install cell must be hidden"
    assert "git+https://github.com/convbook/convbook" in source(install)
    for cell in load(page)["cells"]:
        m = LOCAL_PATH.search(source(cell))
        assert not m, f"{page}: refers to a local path {m.group()!r}: {source(cell)[:120]}"
