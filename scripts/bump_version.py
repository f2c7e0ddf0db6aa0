"""Bump convbook's version in its single source, the `__version__` line of book/00_package.ipynb, then
re-export the package and open a section for the new version in CHANGELOG.md.

    python scripts/bump_version.py patch|minor|major      (or: make bump PART=patch)

(`nbdev-bump-version` cannot be used here: it edits convbook/__init__.py, which nbdev-export then
writes anew from book/00_package.ipynb, so its change would not survive.)
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "00_package.ipynb"
VERSION = re.compile(r'^__version__ = "(\d+)\.(\d+)\.(\d+)"', re.M)


def bumped(version: tuple[int, int, int], part: str) -> tuple[int, int, int]:
    major, minor, patch = version
    return {
        "major": (major + 1, 0, 0),
        "minor": (major, minor + 1, 0),
        "patch": (major, minor, patch + 1),
    }[part]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("major", "minor", "patch"):
        print(__doc__, file=sys.stderr)
        return 2
    nb = json.loads(NOTEBOOK.read_text())
    cells = [c for c in nb["cells"] if VERSION.search("".join(c["source"]))]
    if len(cells) != 1:
        print(
            f"expected one __version__ line in {NOTEBOOK}, found {len(cells)}",
            file=sys.stderr,
        )
        return 1
    text = "".join(cells[0]["source"])
    old = tuple(int(g) for g in VERSION.search(text).groups())
    new = ".".join(map(str, bumped(old, argv[0])))
    text = VERSION.sub(f'__version__ = "{new}"', text, count=1)
    cells[0]["source"] = text.splitlines(keepends=True)
    NOTEBOOK.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    changelog = ROOT / "CHANGELOG.md"
    log = changelog.read_text()
    head = f"## [{new}] - {datetime.date.today().isoformat()}"
    changelog.write_text(
        log.replace("## [Unreleased]", f"## [Unreleased]\n\n{head}", 1)
    )
    nbdev_export = Path(sys.executable).with_name("nbdev-export")
    subprocess.run([str(nbdev_export)], cwd=ROOT, check=True)
    ruff = Path(sys.executable).with_name("ruff")  # `make export` formats the package
    if ruff.exists():
        subprocess.run(
            [str(ruff), "format", "--quiet", "convbook"], cwd=ROOT, check=True
        )
    print(f"{'.'.join(map(str, old))} -> {new}; CHANGELOG.md has a section for it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
