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


ALL_PAGES = [TOC["root"]] + [
    f for part in TOC.get("parts", [TOC]) for f in _toc_files(part.get("chapters"))
]
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
    assert "\n> " in md[0], (
        f"{page}: title cell needs a '> summary' line (the module docstring)"
    )
    text = "\n".join(md)
    assert "## Exercises" in text
    labels = re.findall(r"```\{exercise(?:-start)?\}[^\n]*\n:label: (\S+)", text)
    assert labels, f"{page}: no exercises"
    for label in labels:
        assert f"{{solution-start}} {label}" in text, (
            f"{page}: exercise {label} has no solution"
        )
    assert text.count("{solution-start}") == text.count("{solution-end}")
    assert text.count("{exercise-start}") == text.count("{exercise-end}")


@pytest.mark.parametrize("page", PAGES)
def test_rendered_notebook_has_no_directives(page):
    nb = strip_directives(load(page))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            tags = cell.get("metadata", {}).get("tags", [])
            assert "remove-cell" in tags or not DIRECTIVE.search(source(cell)), source(
                cell
            )[:80]


def test_strip_directives_on_a_sample():
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": "#| default_exp conv"},
            {
                "cell_type": "code",
                "metadata": {},
                "source": ["#| export\n", "def f():\n", "    return 1\n"],
            },
            {"cell_type": "code", "metadata": {}, "source": "#| hide\nimport os"},
            {
                "cell_type": "code",
                "metadata": {"nbdev": {"hide": True}},
                "source": "x = 1",
            },
            {
                "cell_type": "code",
                "metadata": {},
                "source": "x = 2  #| not a directive",
            },
            {"cell_type": "markdown", "metadata": {}, "source": "#| stays in markdown"},
        ]
    }
    cells = strip_directives(nb)["cells"]
    tags = [c["metadata"].get("tags", []) for c in cells]
    assert (
        tags[0] == ["remove-cell"]
        and tags[2] == ["remove-cell"]
        and tags[3] == ["remove-cell"]
    )
    assert cells[1]["source"] == "def f():\n    return 1\n" and tags[1] == []
    assert cells[4]["source"] == "x = 2  #| not a directive" and tags[4] == []
    assert cells[5]["source"] == "#| stays in markdown"


INSTALL_CELL = (
    "# Outside this repository (Colab, a bare Binder), install what this chapter needs."
)
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
    assert re.match(r"\s*#\|\s*hide", source(install)), (
        f"{page}: the install cell must be hidden"
    )
    assert "git+https://github.com/convbook/convbook" in source(install)
    for cell in load(page)["cells"]:
        m = LOCAL_PATH.search(source(cell))
        assert not m, (
            f"{page}: refers to a local path {m.group()!r}: {source(cell)[:120]}"
        )


# ---------------------------------------------------------------------------------------------------
# No measured number is typed into prose. A number followed by ×, x, ms, %, GFLOP, GB/s or "times
# faster/slower/as long" in a Markdown cell must come from the run (myst-nb glue, or Markdown a cell
# generates, neither of which is in the source) unless it is a derivation or a cited fact, listed here
# with why. Math ($...$), code spans and code blocks are derivations and code, not measurements; a
# size such as "3×3" or "2×(240 + 60)" is not followed by a unit of measurement and does not match.

MEASURED = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s*(×(?!\s*[\d(])|x(?![\w(])|ms\b|µs\b|%|GFLOP|GB/s|MB/s|"
    r"times (?:faster|slower|as (?:long|fast|many))|-fold)",
    re.I,
)

ALLOWED_NUMBERS = {  # (page, matched text): why it is not a measurement
    ("book/04_im2col", "1%"): "the tolerance the memory prediction is held to",
    ("book/07_emnist", "2.1%"): "1/47, chance level with 47 classes",
    ("book/07_emnist", "100%"): "a bound: no accuracy can exceed it",
    ("book/07_emnist", "10%"): "a setting: the default held-out fraction",
    ("book/07_emnist", "90%"): "a setting: the training fraction",
    ("book/07_emnist", "11%"): "a derivation: one part in nine",
    ("book/07_emnist", "28%"): "a derivation from the parameter counts",
    ("book/07a_data", "5.5%"): "a derivation: 6,400 / 116,323",
    ("book/07b_layers", "24%"): "a derivation: the softmax of the logits shown",
    ("book/08_fast", "1%"): "the tolerance the memory formula is held to",
    ("book/08a_bench", "1 ms"): "a setting: the length of a sleep",
    ("book/09_winograd", "5×"): "a count: 180 / 36 products per output tile",
}


def prose_of(markdown: str) -> str:
    """Markdown without code blocks, math, code spans and glue roles."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"\$[^$\n]+\$", " ", text)
    text = re.sub(r"\{glue(?::\w+)?\}`[^`]*`", " ", text)
    return re.sub(r"`[^`\n]*`", " ", text)


def typed_numbers(page: str) -> list[str]:
    path = ROOT / f"{page}.ipynb"
    if path.exists():
        cells = [source(c) for c in load(page)["cells"] if c["cell_type"] == "markdown"]
    else:
        cells = [(ROOT / f"{page}.md").read_text()]
    return [m.group(0) for md in cells for m in MEASURED.finditer(prose_of(md))]


@pytest.mark.parametrize("page", ALL_PAGES)
def test_no_measured_number_is_typed_into_prose(page):
    found = [t for t in typed_numbers(page) if (page, t) not in ALLOWED_NUMBERS]
    assert not found, (
        f"{page}: {found} look like measured numbers typed by hand; glue them, "
        "generate the sentence, or list a derivation in ALLOWED_NUMBERS"
    )


def test_the_prose_scanner_catches_typed_measurements():
    for typed in [
        "im2col is 6× slower here",
        "it takes 3.5 ms",
        "a 12% gain",
        "at 40 GFLOP/s",
        "about 2.3x faster",
        "NumPy was 3 times slower",
    ]:
        assert MEASURED.search(prose_of(typed)), typed
    for fine in [
        "a 3×3 kernel",
        "47 × (240 + 60) images",
        "the ratio {glue:text}`r:.1f`×",
        "`t = 3 ms`",
        "$2.25\\times$ fewer",
    ]:
        assert not MEASURED.search(prose_of(fine)), fine


def test_allowed_numbers_are_still_there():
    """A stale allow-list entry would let a new measured number through unnoticed."""
    stale = [key for key in ALLOWED_NUMBERS if key[1] not in typed_numbers(key[0])]
    assert not stale, f"remove these entries: {stale}"
