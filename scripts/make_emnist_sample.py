"""Build the EMNIST sample in convbook/assets from the official ByMerge test file.

    python scripts/make_emnist_sample.py [--source DIR] [--out DIR]

--source holds the official `emnist-bymerge-test-{images-idx3,labels-idx1}-ubyte.gz`
(default: $CONVBOOK_DATA, else ../shared/data/emnist); they are verified against the
official SHA-256. For each of the 47 classes, 300 images are drawn without replacement
with a fixed seed; the first 240 go to the train part, the last 60 to the test part. The
files are IDX in EMNIST's own (transposed) storage order, bz2-compressed: bz2 output
depends only on its input (gzip stores a time stamp), and chapter 7a shows that it is
also smaller here. The script prints the SHA-256 of each file as the lines of the table
`_SAMPLE_SHA256` in book/07a_data.ipynb: subset, kind, hash.
"""

from __future__ import annotations

import argparse
import bz2
import os
from pathlib import Path

import numpy as np

from convbook.data import load_emnist, sha256

SEED, PER_CLASS, TRAIN_PER_CLASS = 2026, 300, 240
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "emnist"


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: (0, 0, 0x08, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def draw(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The sorted indices of each part: PER_CLASS images of each class, seed fixed."""
    rng = np.random.default_rng(SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for k in range(47):
        chosen = rng.choice(np.flatnonzero(labels == k), PER_CLASS, replace=False)
        parts["train"].append(chosen[:TRAIN_PER_CLASS])
        parts["test"].append(chosen[TRAIN_PER_CLASS:])
    return {subset: np.sort(np.concatenate(c)) for subset, c in parts.items()}


def build(source: Path, out: Path) -> dict[tuple[str, str], str]:
    """Write the four sample files into `out`; their SHA-256 by (subset, kind)."""
    images, labels, _ = load_emnist("bymerge", "test", data_dir=source, download=False)
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for subset, idx in draw(labels).items():
        stored = images[idx].transpose(0, 2, 1)  # back to EMNIST's transposed storage
        for kind, arr in (("images", stored), ("labels", labels[idx].astype(np.uint8))):
            name = f"emnist-bymerge-sample-{subset}-{kind}-idx{arr.ndim}-ubyte.bz2"
            (out / name).write_bytes(bz2.compress(idx_bytes(arr), 9))
            digests[subset, kind] = sha256(out / name)
    return digests


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("CONVBOOK_DATA", DEFAULT_SOURCE))
    ap.add_argument("--source", type=Path, default=default)
    ap.add_argument("--out", type=Path, default=ROOT / "convbook" / "assets")
    args = ap.parse_args()
    for (subset, kind), digest in build(args.source, args.out).items():
        print(f"{subset:<5} {kind} {digest}")
