"""Small fixes to the HTML that Jupyter Book 1 (Sphinx 7, sphinx-book-theme) writes.

* Inline scripts added after the builder starts (sphinx-thebe's ``const THEBE_JS_URL = ...``,
  sphinx-togglebutton's selector) reach a page twice: once from Sphinx's registry and once from
  the builder. A second ``const`` declaration is a JavaScript error on every page. Keep the first
  copy of every identical script.
"""

from __future__ import annotations


def _key(js) -> tuple:
    """Identity of a script: its file (None and "" both mean inline) and its attributes."""
    filename = getattr(js, "filename", js) or ""
    attributes = getattr(js, "attributes", {}) or {}
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    seen, kept = set(), []
    for js in context.get("script_files", []):
        if (k := _key(js)) not in seen:
            seen.add(k)
            kept.append(js)
    context["script_files"][:] = kept  # in place: it is the builder's own list


def setup(app):
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
