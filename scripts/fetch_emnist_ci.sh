#!/usr/bin/env bash
# Fetch the official EMNIST test files and mappings into DIR for CI machines that lack the project's
# copy (../shared/data/emnist), and verify every file against the official SHA-256 in convbook.data.
# Usage: scripts/fetch_emnist_ci.sh DIR
set -euo pipefail
dir="${1:?usage: $0 DIR}"
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
curl --fail --location --retry 5 --retry-delay 10 --max-time 3600 \
  -o "$tmp/gzip.zip" https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip
unzip -q -j "$tmp/gzip.zip" 'gzip/emnist-*-test-*-ubyte.gz' 'gzip/emnist-*-mapping.txt' -d "$dir"
python - "$dir" <<'PY'
import hashlib, sys
from pathlib import Path

sys.path.insert(0, ".")
from convbook.data import SHA256

folder = Path(sys.argv[1])
for name, expected in SHA256.items():
    path = folder / name
    if "-test-" in name and path.exists():
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == expected, f"{name}: checksum {actual} is not the official {expected}"
        print("verified", name)
PY
