"""Build the EMNIST sample shipped in convbook/assets from the official ByMerge test file.

    python scripts/make_emnist_sample.py [--source DIR]

DIR holds the official `emnist-bymerge-test-{images-idx3,labels-idx1}-ubyte.gz` (default: the folder
named by $CONVBOOK_DATA, else ../shared/data/emnist). For each of the 47 classes, 300 images are drawn
without replacement with a fixed seed; the first 240 go to the train part, the last 60 to the test part.
The files are IDX in EMNIST's own (transposed) storage order, bz2-compressed: bz2 is deterministic and
about 22% smaller than gzip -9 here. The script prints the SHA-256 of each file for convbook.data.SAMPLE_SHA256.
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


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def build(source: Path, out: Path) -> dict[str, str]:
    images, labels, _ = load_emnist("bymerge", "test", data_dir=source, download=False)
    rng = np.random.default_rng(SEED)
    parts = {"train": [], "test": []}
    for k in range(47):
        chosen = rng.choice(np.flatnonzero(labels == k), PER_CLASS, replace=False)
        parts["train"].append(chosen[:TRAIN_PER_CLASS])
        parts["test"].append(chosen[TRAIN_PER_CLASS:])
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for subset, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        stored = images[idx].transpose(0, 2, 1)             # back to EMNIST's transposed storage
        for kind, arr in (("images-idx3-ubyte", stored), ("labels-idx1-ubyte", labels[idx].astype(np.uint8))):
            path = out / f"emnist-bymerge-sample-{subset}-{kind}.bz2"
            path.write_bytes(bz2.compress(idx_bytes(arr), 9))
            digests[path.name] = sha256(path)
    return digests


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path,
                    default=Path(os.environ.get("CONVBOOK_DATA", ROOT.parent / "shared" / "data" / "emnist")))
    ap.add_argument("--out", type=Path, default=ROOT / "convbook" / "assets")
    args = ap.parse_args()
    for name, digest in build(args.source, args.out).items():
        print(f'    "{name}": "{digest}",')
