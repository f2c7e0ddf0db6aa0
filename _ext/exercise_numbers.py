"""Number exercises per chapter ("Exercise 1.2", "Exercise 5b.1") instead of across the whole book.

sphinx-exercise numbers exercises like figures; without a numbered table of contents Sphinx keeps one
counter for the whole book. This extension renumbers each chapter's exercises from 1, prefixed with
the chapter's number taken from its file name (`book/05b_pooling` -> "5b", `book/A1_exercises`
-> "A1").
"""

from __future__ import annotations

import re

_CHAPTER = re.compile(r"(?:.*/)?([A-Z]?)0*(\d+)([a-z]?)_[^/]*$")


def chapter_of(docname: str) -> str | None:
    """The chapter number of a document name, or None for pages that are not chapters."""
    m = _CHAPTER.match(docname)
    return "".join(m.groups()) if m else None


def renumber_exercises(app, env) -> list[str]:
    for docname, numbers in env.toc_fignumbers.items():
        chapter, exercises = chapter_of(docname), numbers.get("exercise")
        if chapter and exercises:
            in_order = sorted(exercises, key=exercises.get)
            numbers["exercise"] = {
                ids: (chapter, k) for k, ids in enumerate(in_order, 1)
            }
    return []


def setup(app):
    app.connect("env-get-updated", renumber_exercises, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
