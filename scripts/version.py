"""Print the version of the convbook package in this checkout (its single source: convbook/__init__.py)."""

import re
from pathlib import Path

init = Path(__file__).resolve().parents[1] / "convbook" / "__init__.py"
print(re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M).group(1))
