"""Render nbdev notebooks cleanly in Jupyter Book.

nbdev reads directives such as ``#| export`` or ``#| hide`` from the first lines of a code cell
(or from the cell's ``nbdev`` metadata). They are instructions for the exporter, not for readers, so
before Sphinx parses a notebook this extension

* removes the directive lines from every code cell,
* tags cells marked ``hide`` (and cells left empty, such as ``#| default_exp``) ``remove-cell``.

Cells are tagged, never deleted, so cell indices (and the execution cache) stay aligned with the
notebook on disk. The notebook on disk is not modified.
"""

from __future__ import annotations

import json
import re

_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)")


def strip_directives(nb: dict) -> dict:
    """Return ``nb`` with nbdev directive lines removed and hidden cells tagged ``remove-cell``."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        lines = (src if isinstance(src, str) else "".join(src)).splitlines(
            keepends=True
        )
        names = set(cell.get("metadata", {}).get("nbdev", {}) or {})
        n = 0
        while n < len(lines) and (m := _DIRECTIVE.match(lines[n])):
            names.add(m.group(1))
            n += 1
        body = "".join(lines[n:]).lstrip("\n")
        cell["source"] = body
        if "hide" in names or not body.strip():
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            if "remove-cell" not in tags:
                tags.append("remove-cell")
    return nb


def _on_source_read(app, docname, source):
    path = str(app.env.doc2path(docname))
    if path.endswith(".ipynb"):
        source[0] = json.dumps(strip_directives(json.loads(source[0])), indent=1)


def setup(app):
    app.connect("source-read", _on_source_read)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
