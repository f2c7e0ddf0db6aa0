"""The EMNIST data layer of chapter 7a: the IDX reader and its failures, mapping files,
`load_emnist`, the download against a local HTTP server, and the shipped sample.

Almost every test runs on files it generates (IDX written here with `struct`, gzip and
bz2) or on the sample shipped in the package. Generated files that pose as official ones
get their SHA-256 published in `convbook.data.SHA256` for the test (monkeypatched), so
the real verification code runs on them. A few tests need the official EMNIST files
(their checksums, the orientation of real characters, the sample's provenance and
rebuild, the label files of every split): they take the `shared` fixture, which wraps
conftest's `emnist_dir` (skipped with a how-to where the files are absent;
`--require-emnist`, set by CI, makes absence a failure). References are independent of
the package: IDX is parsed and written here with `struct`, hashes come from `hashlib`.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import hashlib
import http.server
import importlib.resources
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import tracemalloc
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

import convbook
import convbook.data as data
from convbook.data import (
    MAPPINGS,
    SAMPLE_DIR,
    SAMPLE_SHA256,
    SHA256,
    SPLITS,
    DataError,
    default_data_dir,
    download_emnist,
    load_emnist,
    load_sample,
    read_idx,
    read_mapping,
    sha256,
)

ROOT = Path(__file__).resolve().parents[1]
MNIST_TEST = (
    "emnist-mnist-test-images-idx3-ubyte.gz",
    "emnist-mnist-test-labels-idx1-ubyte.gz",
)
BYMERGE_TEST = (
    "emnist-bymerge-test-images-idx3-ubyte.gz",
    "emnist-bymerge-test-labels-idx1-ubyte.gz",
)
SAMPLE_TEST = (
    SAMPLE_DIR / "emnist-bymerge-sample-test-images-idx3-ubyte.bz2",
    SAMPLE_DIR / "emnist-bymerge-sample-test-labels-idx1-ubyte.bz2",
)


@pytest.fixture(scope="session")
def shared(emnist_dir) -> Path:
    """The folder of real EMNIST files (conftest's `emnist_dir`: skipped where absent,
    required in CI)."""
    return emnist_dir


# --------------------------------------------------------------------------------------
# Independent references: an IDX writer and parser written with struct, not the package.

CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}
COMPRESS = {"": bytes, ".gz": gzip.compress, ".bz2": bz2.compress}


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding: 0, 0, type code, ndim, big-endian uint32 sizes, big-endian values
    in C order."""
    a = np.asarray(a)
    header = bytes([0, 0, CODES[a.dtype.newbyteorder("=")], a.ndim]) + struct.pack(
        f">{a.ndim}I", *a.shape
    )
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def parse_idx(raw: bytes) -> np.ndarray:
    """Reference parser for uint8 IDX bytes (what EMNIST uses)."""
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and code == 0x08
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def gz(raw: bytes) -> bytes:
    """gzip with a fixed time stamp, so equal content gives equal bytes."""
    return gzip.compress(raw, mtime=0)


def flip_byte(path: Path, position: int) -> None:
    b = bytearray(path.read_bytes())
    b[position] ^= 0xFF
    path.write_bytes(bytes(b))


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@functools.cache
def sample_stored(subset: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample's images in EMNIST's (transposed) storage order and its
    labels, parsed here."""
    stem = SAMPLE_DIR / f"emnist-bymerge-sample-{subset}"
    images = parse_idx(
        bz2.decompress(Path(f"{stem}-images-idx3-ubyte.bz2").read_bytes())
    )
    labels = parse_idx(
        bz2.decompress(Path(f"{stem}-labels-idx1-ubyte.bz2").read_bytes())
    )
    return images, labels


def official_files(
    split: str = "mnist", subset: str = "test", images=None, labels=None
) -> dict[str, bytes]:
    """Gzipped IDX files under the official names of `split`/`subset`. Default content:
    the sample's real digits (labels 0..9), in storage order."""
    if images is None:
        x, y = sample_stored()
        keep = y < 10
        images, labels = x[keep], y[keep]
    stem = f"emnist-{split}-{subset}"
    return {
        f"{stem}-images-idx3-ubyte.gz": gz(idx_bytes(np.asarray(images, np.uint8))),
        f"{stem}-labels-idx1-ubyte.gz": gz(idx_bytes(np.asarray(labels, np.uint8))),
    }


@pytest.fixture
def publish(monkeypatch):
    """Publish the SHA-256 of generated files under their official names in
    convbook.data.SHA256 (for this test only), as NIST publishes those of the real ones.
    """

    def register(files: dict[str, bytes]) -> dict[str, bytes]:
        for name, content in files.items():
            assert name in SHA256, f"{name} is not an official name"
            monkeypatch.setitem(data.SHA256, name, digest(content))
        return files

    return register


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.fixture
def mnist_dir(tmp_path, publish) -> Path:
    """A folder with generated MNIST-test files under their official names, their hashes
    published."""
    return write_files(tmp_path / "mnist", publish(official_files()))


NOWHERE = "http://127.0.0.1:9/x.zip"  # port 9 (discard): the connection is refused


def load_mnist_test(folder: Path, **kwargs):
    """`load_emnist("mnist", "test")` from `folder`."""
    return load_emnist("mnist", "test", data_dir=folder, **kwargs)


# --------------------------------------------------------------------------------------
# read_idx: round trips

ARRAYS = {
    "uint8 images": np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7) * 3,
    "uint8 labels": np.array([0, 255, 7, 46], dtype=np.uint8),
    "int8": np.array([[-128, -1], [0, 127]], dtype=np.int8),
    "int16": np.array([1, -2, 300, -32768, 32767], dtype=np.int16),
    "int32": np.array([[2**31 - 1, -(2**31)], [65536, -7]], dtype=np.int32),
    "float32": np.array([0.5, -1.25e-30, 3.4e38, -0.0], dtype=np.float32),
    "float64": np.linspace(-1e300, 1e300, 12).reshape(3, 2, 2),
    "empty": np.zeros((0, 28, 28), dtype=np.uint8),
    "4-D": np.arange(120, dtype=np.int16).reshape(2, 3, 4, 5),
    # 2.5 MiB: the buffer grows twice past its first MiB, and blocks end inside a value
    "more than one block": np.random.default_rng(1).integers(
        -(2**15), 2**15, (5, 3, 87382), dtype=np.int16
    ),
}


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("name", list(ARRAYS))
def test_read_idx_round_trip(tmp_path, suffix, name):
    a = ARRAYS[name]
    path = tmp_path / f"a.idx{suffix}"
    path.write_bytes(COMPRESS[suffix](idx_bytes(a)))
    b = read_idx(path, expect_ndim=a.ndim)
    assert b.dtype == a.dtype and b.dtype.isnative and b.shape == a.shape
    assert np.array_equal(a, b)
    if a.dtype.kind == "f":  # -0.0 keeps its sign
        assert np.array_equal(np.signbit(a), np.signbit(b))
    assert b.flags.writeable and b.flags.c_contiguous


def test_read_idx_is_big_endian(tmp_path):
    path = tmp_path / "be.idx"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2]) + bytes.fromhex("012c ff38"))
    assert read_idx(path).tolist() == [300, -200]


def test_read_idx_accepts_path_strings_and_zero_dimensions(tmp_path):
    path = tmp_path / "scalar.idx"
    # ndim 0: one value
    path.write_bytes(bytes([0, 0, 0x0C, 0]) + struct.pack(">i", -5))
    assert read_idx(str(path)).shape == () and int(read_idx(path)) == -5


# --------------------------------------------------------------------------------------
# read_idx: every corruption is a DataError that names the file

GOOD = idx_bytes(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
GZ_GOOD = gzip.compress(GOOD)
# 2**64 bytes: np.prod(int64) gives 0
WRAPS = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", *[2**16] * 4)
CORRUPT = {  # case: (file name, bytes or None for no file, read_idx keyword arguments)
    "truncated gzip stream": ("cut.idx.gz", GZ_GOOD[: len(GZ_GOOD) // 2], {}),
    "gzip stream without its trailer": ("trailer.idx.gz", GZ_GOOD[:-4], {}),
    "truncated bz2 stream": ("cut.idx.bz2", bz2.compress(GOOD)[:500], {}),
    "not gzip despite .gz": ("plain.idx.gz", GOOD, {}),
    "not bz2 despite .bz2": ("plain.idx.bz2", GOOD, {}),
    "truncated data": ("short.idx", GOOD[:-1], {}),
    "truncated data inside gzip": ("short.idx.gz", gzip.compress(GOOD[:-784]), {}),
    "extra bytes": ("long.idx", GOOD + b"\0", {}),
    "extra bytes inside bz2": ("long.idx.bz2", bz2.compress(GOOD + bytes(784)), {}),
    "wrong magic: first byte": ("magic1.idx", b"\x01" + GOOD[1:], {}),
    "wrong magic: unknown type code": ("magic2.idx", GOOD[:2] + b"\x07" + GOOD[3:], {}),
    "wrong magic: an HTML page": (
        "page.idx.gz",
        gzip.compress(b"<!DOCTYPE html><html></html>"),
        {},
    ),
    "wrong ndim: labels read as images": (
        "labels.idx",
        idx_bytes(np.arange(4, dtype=np.uint8)),
        {"expect_ndim": 3},
    ),
    "wrong ndim: images read as labels": ("images.idx", GOOD, {"expect_ndim": 1}),
    "truncated header": ("header.idx", GOOD[:11], {}),
    "empty file": ("empty.idx", b"", {}),
    "missing file": ("missing.idx", None, {}),
    "a folder, not a file": ("folder.idx", "folder", {}),
    # sizes whose product wraps around in int64 (the old reader asked NumPy for them)
    "sizes whose product wraps int64": ("wraps.idx", WRAPS, {}),
    "sizes whose product wraps int64, no max_bytes": (
        "wraps2.idx",
        WRAPS,
        {"max_bytes": None},
    ),
    "a zero size beside huge ones": (
        "zero.idx",
        bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1),
        {},
    ),
    "255 dimensions": (
        "deep.idx",
        bytes([0, 0, 0x08, 255]) + struct.pack(">255I", *[1] * 255) + b"\0",
        {},
    ),
    "33 dimensions": (
        "deep33.idx",
        bytes([0, 0, 0x08, 33]) + struct.pack(">33I", *[1] * 33) + b"\0",
        {},
    ),
    "more than max_bytes": ("big.idx", GOOD, {"max_bytes": 28 * 28 * 4 - 1}),
}


def write_case(folder: Path, case: str) -> tuple[Path, dict]:
    name, content, kwargs = CORRUPT[case]
    path = folder / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path, kwargs


def assert_rejects(reader, path: Path, **kwargs) -> DataError:
    """`reader(path)` must raise DataError, and the message must name the file."""
    with pytest.raises(DataError) as info:
        reader(path, **kwargs)
    assert str(path) in str(info.value), (
        f"the message does not name {path}: {info.value}"
    )
    return info.value


@pytest.mark.parametrize("case", list(CORRUPT))
def test_read_idx_rejects_corruption(tmp_path, case):
    path, kwargs = write_case(tmp_path, case)
    assert_rejects(read_idx, path, **kwargs)


def test_read_idx_limits_are_exact(tmp_path):
    """max_bytes is the promised data in bytes: exactly that many pass, one fewer does
    not."""
    path, _ = write_case(tmp_path, "more than max_bytes")
    assert read_idx(path, max_bytes=len(GOOD) - 16).shape == (4, 28, 28)
    assert "max_bytes" in str(assert_rejects(read_idx, path, max_bytes=len(GOOD) - 17))
    deep32 = tmp_path / "deep32.idx"
    deep32.write_bytes(bytes([0, 0, 0x08, 32]) + struct.pack(">32I", *[1] * 32) + b"\7")
    assert read_idx(deep32).shape == (1,) * 32


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"path": 3}, TypeError, "path must be"),
        ({"path": None}, TypeError, "path must be"),
        ({"expect_ndim": "3"}, TypeError, "expect_ndim"),
        ({"expect_ndim": -1}, ValueError, "expect_ndim"),
        ({"max_bytes": 1.5}, TypeError, "max_bytes"),
        ({"max_bytes": -1}, ValueError, "max_bytes"),
    ],
)
def test_read_idx_bad_arguments(tmp_path, kwargs, error, word):
    path = tmp_path / "good.idx"
    path.write_bytes(GOOD)
    kwargs = {"path": path, **kwargs}
    with pytest.raises(error, match=word) as info:
        read_idx(kwargs.pop("path"), **kwargs)
    assert not isinstance(info.value, DataError) or error is ValueError


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def sloppy_read_idx(path, *, expect_ndim=None):
    """A deliberately wrong reader: it trusts the header and ignores bytes beyond what
    it promises."""
    raw = (
        gzip.decompress(Path(path).read_bytes())
        if str(path).endswith(".gz")
        else Path(path).read_bytes()
    )
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(
        raw, np.uint8, count=int(np.prod(shape)), offset=4 + 4 * ndim
    ).reshape(shape)


@pytest.mark.parametrize("case", ["extra bytes", "wrong ndim: images read as labels"])
def test_a_sloppy_reader_is_caught(tmp_path, case):
    """The assertions above are not vacuous: a reader without the length and ndim checks
    fails them."""
    path, kwargs = write_case(tmp_path, case)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        assert_rejects(sloppy_read_idx, path, **kwargs)


def test_read_idx_corrupt_gzip_body_is_data_error(tmp_path):
    """A byte flipped deep in a gzip stream is caught by gzip's CRC-32 and reported as
    DataError."""
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(GOOD * 50))
    flip_byte(path, path.stat().st_size // 2)
    assert_rejects(read_idx, path)


def test_read_idx_corrupt_deflate_block_is_data_error(tmp_path):
    """A byte flipped early in the Huffman-coded deflate blocks of real (compressible)
    images."""
    images, _ = sample_stored()
    path = tmp_path / "images.idx.gz"
    path.write_bytes(gz(idx_bytes(images[:500])))
    flip_byte(path, 100)
    assert_rejects(read_idx, path)


# --------------------------------------------------------------------------------------
# read_idx in bounded memory: the header first, then the data counted as it arrives


def write_bomb(path: Path, header_images: int, zeros_mib: int, opener) -> None:
    """An IDX header for `header_images` 28x28 images, their pixels, then `zeros_mib`
    MiB of zeros, compressed in a stream (the test never holds the decompressed content
    in memory)."""
    with opener(path, "wb") as f:
        f.write(idx_bytes(np.zeros((header_images, 28, 28), np.uint8)))
        block = bytes(1 << 20)
        for _ in range(zeros_mib):
            f.write(block)


def traced_peak(call) -> tuple[BaseException | None, int]:
    """Run `call()`; the exception it raised (or None) and the peak of memory
    tracemalloc saw."""
    tracemalloc.start()
    try:
        call()
        error = None
    except Exception as e:  # noqa: BLE001 - returned to the test
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_a_compression_bomb_is_rejected_in_bounded_memory(tmp_path, suffix, opener):
    """64 MiB of zeros behind a header for 4 images: rejected after reading one byte too
    many, at a peak far below the decompressed size (decompressing first, as before,
    needs all of it)."""
    path = tmp_path / f"bomb.idx{suffix}"
    write_bomb(path, 4, 64, opener)
    assert path.stat().st_size < 1 << 20
    error, peak = traced_peak(lambda: read_idx(path))
    assert peak < 8 << 20, (
        f"read_idx peaked at {peak:,} bytes for a file promising 3,136"
    )
    assert (
        isinstance(error, DataError)
        and str(path) in str(error)
        and "more data" in str(error)
    )
    # What decompress-then-check costs
    _, reference = traced_peak(lambda: opener(path).read())
    assert reference > 64 << 20 > 8 * peak


def test_a_header_promising_more_than_the_file_holds_costs_no_memory(tmp_path):
    """A header for 1 GiB (allowed by max_bytes) in front of 1 MiB of data: the buffer
    grows only as data arrives, so the truncation is found without allocating what the
    header promised."""
    path = tmp_path / "liar.idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 1 << 20, 32, 32))
        f.write(bytes(1 << 20))
    error, peak = traced_peak(lambda: read_idx(path))
    assert isinstance(error, DataError) and "truncated" in str(error)
    assert peak < 16 << 20, f"peak {peak:,} bytes"
    assert "max_bytes" in str(assert_rejects(read_idx, path, max_bytes=1 << 29))


# --------------------------------------------------------------------------------------
# read_mapping


def mapping_text(mapping: dict[int, str]) -> str:
    """The official format, written here: `label code [code ...]` per line."""
    return "".join(
        f"{k} {' '.join(str(ord(c)) for c in v)}\n" for k, v in mapping.items()
    )


def test_read_mapping_good_file(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("0 48\n\n1 49  \r\n  2 65 97\n")
    assert read_mapping(path) == {0: "0", 1: "1", 2: "Aa"}
    assert read_mapping(str(path)) == read_mapping(path)


@pytest.mark.parametrize("split", list(SPLITS))
def test_read_mapping_reads_what_the_official_format_writes(tmp_path, split):
    path = tmp_path / f"emnist-{split}-mapping.txt"
    path.write_text(mapping_text(MAPPINGS[split]))
    assert read_mapping(path) == MAPPINGS[split]


@pytest.mark.parametrize(
    "line",
    [
        "2 fifty",
        "7",
        "3 48.0",
        "x 48",
        "5 -1",
        "5 1114112",
        "+5 48",
        "5 4_8",
        "5 100000000000000000000000000000",
        "5 7",
        "5 0",
        "5 48 10",
        "\u0665 48",
        "5 \u0664\u0668",
    ],
)
def test_read_mapping_malformed_line(tmp_path, line):
    """Including codes too large for chr (OverflowError before), control characters and
    non-ASCII digits that int() would accept."""
    path = tmp_path / "emnist-x-mapping.txt"
    path.write_bytes(f"0 48\n1 49\n{line}\n".encode("utf-8"))
    with pytest.raises(DataError) as info:
        read_mapping(path)
    assert str(path) in str(info.value)
    assert line.isascii() <= ("line 3" in str(info.value))


@pytest.mark.parametrize(
    "content, word",
    [
        (bytes(range(256)), "not ASCII"),
        (b"0 48\n\xff\xfe binary\n", "not ASCII"),
        (b"\x00\x00\x00\x00", "line 1"),
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (b"0 48\n" * 20_000, "too large"),
    ],
)
def test_read_mapping_binary_empty_or_huge(tmp_path, content, word):
    path = tmp_path / "emnist-x-mapping.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=word) as info:
        read_mapping(path)
    assert str(path) in str(info.value)


def test_read_mapping_duplicate_labels_are_an_error(tmp_path):
    """A label given twice must not silently replace the first line's character."""
    path = tmp_path / "emnist-x-mapping.txt"
    path.write_text("0 48\n1 49\n2 50\n1 73\n")
    with pytest.raises(
        DataError, match=r"line 4: label 1 again \(first on line 2\)"
    ) as info:
        read_mapping(path)
    assert str(path) in str(info.value)


def test_read_mapping_missing_file_and_bad_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_mapping(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="no such file"):
        read_mapping(tmp_path)  # a folder
    with pytest.raises(TypeError, match="path must be"):
        read_mapping(42)


def test_mappings_and_splits_agree():
    assert MAPPINGS["bymerge"] == MAPPINGS["balanced"]
    assert set(MAPPINGS) == set(SPLITS)
    for split, n in SPLITS.items():
        # The official values: Letters counts from 1
        first = 1 if split == "letters" else 0
        assert sorted(MAPPINGS[split]) == list(range(first, first + n)), split


def test_read_mapping_official_files(shared):
    """The official mapping files, where the folder has them: next to the gzip files in
    a real download (flat, or under gzip/, which conftest resolves), and in
    ../shared/data/emnist the official Balanced file at the top and the others under
    partial/. At least the Balanced one must be there."""
    found = {}
    for split in SPLITS:
        name = f"emnist-{split}-mapping.txt"
        path = next(
            (p for p in (shared / name, shared / "partial" / name) if p.is_file()), None
        )
        if path is not None:
            found[split] = path
            assert read_mapping(path) == MAPPINGS[split], path
    assert "balanced" in found, f"no emnist-balanced-mapping.txt in {shared}"


# --------------------------------------------------------------------------------------
# Each official split's labels against its mapping (official values: 1..26 for Letters)

REAL_LABEL_FILES = {
    "balanced": "emnist-balanced-test-labels-idx1-ubyte.gz",
    "letters": "emnist-letters-test-labels-idx1-ubyte.gz",
    "mnist": "emnist-mnist-test-labels-idx1-ubyte.gz",
    "bymerge": "emnist-bymerge-test-labels-idx1-ubyte.gz",
    "byclass": "emnist-byclass-test-labels-idx1-ubyte.gz",
}


@pytest.mark.parametrize("split", list(REAL_LABEL_FILES))
def test_real_label_range_matches_the_mapping(shared, split, request):
    """The official test labels of each split use exactly the keys of MAPPINGS."""
    path = shared / REAL_LABEL_FILES[split]
    if not path.is_file():
        message = f"{shared} lacks {path.name}"
        if request.config.getoption("--require-emnist"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert sha256(path) == SHA256[path.name]
    labels = read_idx(path, expect_ndim=1)
    assert set(np.unique(labels).tolist()) == set(MAPPINGS[split]), split


@pytest.mark.parametrize("split", list(SPLITS))
def test_generated_labels_of_every_split(tmp_path, publish, split):
    """Every official label value loads and keeps its value; one below and one above the
    range fail."""
    keys = sorted(MAPPINGS[split])
    labels = np.array(keys * 2, np.uint8)
    folder = write_files(
        tmp_path / "ok",
        publish(
            official_files(
                split, "test", np.zeros((len(labels), 28, 28), np.uint8), labels
            )
        ),
    )
    _, loaded, mapping = load_emnist(split, "test", data_dir=folder, download=False)
    assert loaded.tolist() == labels.tolist() and mapping == MAPPINGS[split]
    for outside in (keys[0] - 1, keys[-1] + 1):
        if outside < 0:
            continue
        bad = np.append(labels, outside).astype(np.uint8)
        folder = write_files(
            tmp_path / f"bad{outside}",
            publish(
                official_files(
                    split, "test", np.zeros((len(bad), 28, 28), np.uint8), bad
                )
            ),
        )
        with pytest.raises(
            DataError, match=f"outside the {split} mapping: \\[{outside}\\]"
        ):
            load_emnist(split, "test", data_dir=folder, download=False)


# --------------------------------------------------------------------------------------
# Orientation: images are returned upright


@contextlib.contextmanager
def sha256_spy():
    """Record every path that convbook.data hashes."""
    calls: list[Path] = []
    real = data.sha256

    def spy(path):
        calls.append(Path(path))
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "sha256", spy)
        yield calls


def top_to_left_ink(images: np.ndarray) -> float:
    mean = images.mean(axis=0)
    return float(mean[3:10, :].sum() / mean[:, 3:10].sum())


def assert_transposed_storage(images, raw_path: Path) -> None:
    """Images are the arrays stored in the (gzip or bz2) IDX file, transposed."""
    raw = parse_idx(
        gzip.decompress(raw_path.read_bytes())
        if raw_path.suffix == ".gz"
        else bz2.decompress(raw_path.read_bytes())
    )
    assert images.shape == raw.shape
    assert np.array_equal(images, raw.transpose(0, 2, 1)), (
        "images are not the transposed stored arrays"
    )


def assert_bar_on_top(images, labels, mapping) -> None:
    """Independent of the file: a '7' and a 'T' have their bar at the top, so the mean
    image has much more ink in rows 3..9 than in columns 3..9."""
    label_of = {c: k for k, c in mapping.items()}
    for c in "7T":
        if c in label_of:
            ratio = top_to_left_ink(images[labels == label_of[c]])
            assert ratio > 1.5, (
                f"'{c}' has no bar at the top (top/left ink {ratio:.2f}): not upright"
            )


def assert_upright(images, labels, mapping, raw_path: Path) -> None:
    assert_transposed_storage(images, raw_path)
    assert_bar_on_top(images, labels, mapping)


def test_a_loader_that_forgets_the_transpose_is_caught():
    """The orientation assertions are not vacuous: each one alone rejects images left as
    stored (the sample's real characters, read without the transpose)."""
    forgetful = read_idx(SAMPLE_TEST[0], expect_ndim=3)  # as stored, not transposed
    labels = read_idx(SAMPLE_TEST[1], expect_ndim=1)
    with pytest.raises(AssertionError, match="not the transposed stored arrays"):
        assert_transposed_storage(forgetful, SAMPLE_TEST[0])
    with pytest.raises(AssertionError, match="not upright"):
        assert_bar_on_top(forgetful, labels, MAPPINGS["bymerge"])


def test_generated_official_files_load_upright_and_verified(mnist_dir):
    with sha256_spy() as calls:
        images, labels, mapping = load_emnist(
            "mnist", "test", data_dir=mnist_dir, download=False
        )
    assert (
        images.dtype == np.uint8
        and images.flags.c_contiguous
        and labels.dtype == np.int64
    )
    assert np.bincount(labels).tolist() == [60] * 10 and mapping == MAPPINGS["mnist"]
    assert sorted(calls) == sorted(mnist_dir / n for n in MNIST_TEST)
    assert_upright(images, labels, mapping, mnist_dir / MNIST_TEST[0])


# --------------------------------------------------------------------------------------
# load_emnist on the real files


@pytest.fixture(scope="module")
def bymerge(shared):
    with sha256_spy() as calls:
        images, labels, mapping = load_emnist(
            "bymerge", "test", data_dir=shared, download=False
        )
    return images, labels, mapping, calls


def test_bymerge_test_file(bymerge):
    images, labels, mapping, _ = bymerge
    assert (
        images.shape == (116_323, 28, 28)
        and images.dtype == np.uint8
        and images.flags.c_contiguous
    )
    assert labels.shape == (116_323,) and labels.dtype == np.int64
    counts = np.bincount(labels)
    assert len(counts) == 47 and counts.min() == 415 and counts.max() == 6400
    assert mapping == MAPPINGS["bymerge"]
    assert 40 < images.mean() < 48  # white ink on black, mean about 44


def test_bymerge_checksums_verified(bymerge, shared):
    *_, calls = bymerge
    assert sorted(calls) == sorted(shared / n for n in BYMERGE_TEST)
    for name in BYMERGE_TEST:
        assert hashlib.sha256((shared / name).read_bytes()).hexdigest() == SHA256[name]


def test_bymerge_upright(bymerge, shared):
    images, labels, mapping, _ = bymerge
    assert_upright(images, labels, mapping, shared / BYMERGE_TEST[0])


def test_mnist_test_file(shared):
    with sha256_spy() as calls:
        images, labels, mapping = load_emnist(
            "mnist", "test", data_dir=shared, download=False
        )
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    assert mapping == MAPPINGS["mnist"]
    assert sorted(calls) == sorted(shared / n for n in MNIST_TEST)
    assert_upright(images, labels, mapping, shared / MNIST_TEST[0])


def test_official_checksum_table(shared):
    files = sorted(shared.glob("emnist-*.gz"))
    assert len(files) >= 8
    for f in files:
        assert (
            sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() == SHA256[f.name]
        ), f.name
    names = {
        f"emnist-{s}-{sub}-{k}.gz"
        for s in SPLITS
        for sub in ("train", "test")
        for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    }
    assert set(SHA256) == names


def test_label_only_files(shared):
    balanced = read_idx(
        shared / "emnist-balanced-test-labels-idx1-ubyte.gz", expect_ndim=1
    )
    assert np.bincount(balanced).tolist() == [400] * 47
    letters = read_idx(
        shared / "emnist-letters-test-labels-idx1-ubyte.gz", expect_ndim=1
    )
    assert letters.min() == 1 and np.bincount(letters)[1:].tolist() == [800] * 26
    assert set(np.unique(letters).tolist()) == set(MAPPINGS["letters"])


# --------------------------------------------------------------------------------------
# load_emnist on generated files: checksums, layouts, what verify=True refuses


def test_the_checksum_table_has_the_official_names():
    names = {
        f"emnist-{s}-{sub}-{k}.gz"
        for s in SPLITS
        for sub in ("train", "test")
        for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    }
    assert set(SHA256) == names and len(set(SHA256.values())) == 24
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in SHA256.values())


@pytest.mark.parametrize("which", [0, 1])
def test_flipped_byte_fails_the_checksum(mnist_dir, which):
    path = mnist_dir / MNIST_TEST[which]
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False)
    assert str(path) in str(info.value)


def test_flipped_byte_without_verify_is_still_caught(mnist_dir):
    path = mnist_dir / MNIST_TEST[0]
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(DataError) as info:
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False, verify=False)
    assert str(path) in str(info.value) and "checksum" not in str(info.value)


def test_a_loader_without_verification_is_caught(mnist_dir, monkeypatch):
    """The checksum tests are not vacuous: with the comparison disabled, a file changed
    in a way that gzip cannot notice (other labels, valid stream) is accepted."""
    x, y = sample_stored()
    keep = y < 10
    # Every label shifted
    other = official_files(images=x[keep], labels=(y[keep] + 1) % 10)
    write_files(mnist_dir, {MNIST_TEST[1]: other[MNIST_TEST[1]]})
    with pytest.raises(DataError, match="checksum mismatch"):
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False)
    monkeypatch.setattr(data, "_check_digest", lambda *args: None)
    _, labels, _ = load_emnist("mnist", "test", data_dir=mnist_dir, download=False)
    assert np.array_equal(labels, (y[keep] + 1) % 10)


def test_missing_files_without_download(tmp_path, mnist_dir):
    with pytest.raises(DataError, match="not found") as info:
        load_emnist("mnist", "train", data_dir=mnist_dir, download=False)
    assert "emnist-mnist-train-images-idx3-ubyte.gz" in str(info.value) and str(
        mnist_dir
    ) in str(info.value)
    (mnist_dir / MNIST_TEST[1]).unlink()
    with pytest.raises(DataError, match="labels-idx1") as info:
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False)
    assert "images-idx3" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_emnist("mnist", "test", data_dir=tmp_path / "nowhere", download=False)


@pytest.mark.parametrize(
    "split, subset, error, word",
    [
        ("bymerg", "test", ValueError, "split"),
        ("sample", "test", ValueError, "split"),
        ("mnist", "valid", ValueError, "subset"),
        ("MNIST", "test", ValueError, "split"),
        (None, "test", TypeError, "split must be a str"),
        (["mnist"], "test", TypeError, "split must be a str"),
        ("mnist", 0, TypeError, "subset must be a str"),
    ],
)
def test_wrong_names(tmp_path, split, subset, error, word):
    with pytest.raises(error, match=word) as info:
        load_emnist(split, subset, data_dir=tmp_path / "cache", url=NOWHERE)
    assert not isinstance(info.value, DataError)
    assert not (tmp_path / "cache").exists()  # nothing was touched


@pytest.mark.parametrize("download", [True, False])
def test_a_file_given_as_data_dir(tmp_path, download):
    """Before: FileExistsError from mkdir (download=True) or a misleading 'does not
    exist'."""
    path = tmp_path / "gzip.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a folder") as info:
        load_mnist_test(path, download=download, url=NOWHERE)
    assert str(path) in str(info.value) and "data_dir" in str(info.value)
    with pytest.raises(DataError, match="is a file, not a folder"):
        download_emnist(path, url=NOWHERE, progress=False)
    assert path.read_bytes() == b"PK"


def test_a_file_as_convbook_data(tmp_path, monkeypatch):
    path = tmp_path / "emnist"
    path.write_text("")
    monkeypatch.setenv("CONVBOOK_DATA", str(path))
    with pytest.raises(DataError, match=r"is a file, not a folder") as info:
        load_emnist("mnist", "test", download=False)
    assert "$CONVBOOK_DATA" in str(info.value)


@pytest.mark.parametrize("data_dir", [3, 2.5, b"/tmp", ["dir"]])
def test_data_dir_of_the_wrong_type(data_dir):
    with pytest.raises(TypeError, match="data_dir must be a path"):
        load_emnist("mnist", "test", data_dir=data_dir, download=False)


def test_layouts_gzip_folder_flat_and_decompressed(tmp_path, publish):
    """Official .gz files flat or under gzip/ load with verify=True; decompressed copies
    only with verify=False."""
    files = publish(official_files())
    nested = write_files(tmp_path / "nested" / "gzip", files).parent
    flat = write_files(tmp_path / "flat", files)
    plain = write_files(
        tmp_path / "plain" / "gzip",
        {n.removesuffix(".gz"): gzip.decompress(b) for n, b in files.items()},
    ).parent
    reference = load_emnist("mnist", "test", data_dir=flat, download=False)
    for folder in (nested, flat):
        images, labels, _ = load_emnist(
            "mnist", "test", data_dir=folder, download=False
        )
        assert np.array_equal(images, reference[0]) and np.array_equal(
            labels, reference[1]
        )
    images, labels, _ = load_emnist(
        "mnist", "test", data_dir=plain, download=False, verify=False
    )
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


@pytest.mark.parametrize("download", [True, False])
def test_verify_never_uses_a_decompressed_copy(tmp_path, download):
    """No published hash covers a decompressed file: with verify=True it is refused, by
    name, and no download is attempted in its place (the URL would refuse the
    connection)."""
    folder = tmp_path / "plain"
    stored = {
        n.removesuffix(".gz"): gzip.decompress(b) for n, b in official_files().items()
    }
    write_files(folder, stored)
    with pytest.raises(DataError, match="decompressed copy.*verify=False") as info:
        load_mnist_test(folder, download=download, url=NOWHERE)
    assert str(folder / "emnist-mnist-test-images-idx3-ubyte") in str(info.value)
    assert sorted(p.name for p in folder.iterdir()) == sorted(stored)


def test_the_gz_file_wins_over_a_decompressed_impostor(tmp_path, publish):
    files = publish(official_files())
    folder = write_files(tmp_path / "both", files)
    black = idx_bytes(np.zeros((600, 28, 28), np.uint8))
    (folder / MNIST_TEST[0].removesuffix(".gz")).write_bytes(black)
    for verify in (True, False):
        images, _, _ = load_emnist(
            "mnist", "test", data_dir=folder, download=False, verify=verify
        )
        assert images.any(), "the all-black decompressed copy was used"


def test_images_and_labels_disagree(tmp_path, publish):
    x, y = sample_stored()
    files = publish(official_files(images=x[:10], labels=y[:9] % 10))
    with pytest.raises(DataError, match="disagree"):
        load_emnist(
            "mnist", "test", data_dir=write_files(tmp_path / "d", files), download=False
        )


@pytest.mark.parametrize(
    "images, labels, word",
    [
        (
            np.zeros((3, 27, 28), np.uint8),
            np.zeros(3, np.uint8),
            "not \\(N, 28, 28\\) uint8",
        ),
        (
            np.zeros((3, 28, 28), np.float32),
            np.zeros(3, np.uint8),
            "not \\(N, 28, 28\\) uint8",
        ),
        (np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.float64), "disagree"),
    ],
)
def test_files_of_the_wrong_kind(tmp_path, images, labels, word):
    """Images must be 28x28 bytes and labels integers (a float labels file was silently
    truncated)."""
    folder = tmp_path / "kind"
    folder.mkdir()
    (folder / "emnist-mnist-test-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "emnist-mnist-test-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match=word):
        load_emnist("mnist", "test", data_dir=folder, download=False, verify=False)


def test_labels_outside_the_mapping(tmp_path, publish):
    files = publish(
        official_files(
            images=np.zeros((3, 28, 28), np.uint8), labels=np.array([0, 9, 12])
        )
    )
    with pytest.raises(DataError, match=r"outside the mnist mapping: \[12\]"):
        load_emnist(
            "mnist", "test", data_dir=write_files(tmp_path / "m", files), download=False
        )


def test_a_mapping_file_must_be_official_unless_verify_is_off(mnist_dir):
    """The official content of every mapping file is MAPPINGS: with verify=True a
    different file is refused; with verify=False it is a custom mapping, used as it is.
    """
    official = mnist_dir / "emnist-mnist-mapping.txt"
    official.write_text(mapping_text(MAPPINGS["mnist"]))
    assert (
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False)[2]
        == MAPPINGS["mnist"]
    )
    custom = {
        k: "zero one two three four five six seven eight nine".split()[k][0]
        for k in range(10)
    }
    (mnist_dir / "gzip").mkdir()
    official.rename(mnist_dir / "gzip" / official.name)
    (mnist_dir / "gzip" / official.name).write_text(mapping_text(custom))
    with pytest.raises(DataError, match="not the official mnist mapping") as info:
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False)
    assert str(mnist_dir / "gzip" / official.name) in str(info.value)
    assert (
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False, verify=False)[
            2
        ]
        == custom
    )


def test_an_unreadable_mapping_file_is_reported(mnist_dir):
    (mnist_dir / "emnist-mnist-mapping.txt").write_bytes(b"0 48\n0 48\n")
    with pytest.raises(DataError, match="label 0 again"):
        load_emnist("mnist", "test", data_dir=mnist_dir, download=False, verify=False)


# --------------------------------------------------------------------------------------
# The download path, for real, against a server on 127.0.0.1, with generated files whose
# hashes are published for the test


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records each request's path in `self.server.requests`."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serving(folder: Path, handler_class=None):
    """Serve `folder` on 127.0.0.1 (a free port) in a thread; yield (base URL, list of
    requested paths)."""
    factory = handler_class or functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def members_of(files: dict[str, bytes]) -> dict[str, bytes]:
    """The official archive's layout: each file under gzip/."""
    return {f"gzip/{name}": content for name, content in files.items()}


def make_site(folder: Path, members: dict[str, bytes], name: str = "gzip.zip") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_STORED) as z:
        z.writestr("gzip/", b"")  # the folder entry, as in the official archive
        for member, content in members.items():
            z.writestr(member, content)
    return folder


@pytest.fixture
def mnist_files(publish) -> dict[str, bytes]:
    """Generated MNIST-test files under their official names, with their hashes
    published."""
    return publish(official_files())


@pytest.fixture
def site(tmp_path, mnist_files) -> Path:
    """A folder serving gzip.zip: the official layout with the generated MNIST-test
    files and the official mapping file, as in NIST's archive."""
    mapping = {
        "gzip/emnist-mnist-mapping.txt": mapping_text(MAPPINGS["mnist"]).encode()
    }
    return make_site(tmp_path / "site", {**mapping, **members_of(mnist_files)})


def fetch(cache: Path, url: str, **kwargs):
    return load_emnist(
        "mnist", "test", data_dir=cache, url=url, progress=False, **kwargs
    )


def test_download_verifies_and_loads(tmp_path, site, mnist_files):
    cache = tmp_path / "cache"
    with serving(site) as (base, requests), sha256_spy() as calls:
        images, labels, mapping = fetch(cache, f"{base}/gzip.zip")
    assert requests == ["/gzip.zip"]
    # No mapping file, no leftovers
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_files)
    for name, content in mnist_files.items():
        assert (cache / name).read_bytes() == content
        assert cache / name in calls, f"{name} not verified on load"
    reference = load_emnist(
        "mnist",
        "test",
        data_dir=write_files(tmp_path / "ref", mnist_files),
        download=False,
    )
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])
    assert mapping == MAPPINGS["mnist"]
    with serving(site) as (base, requests):  # cached now: no second download
        again = fetch(cache, f"{base}/gzip.zip")
    assert requests == [] and np.array_equal(again[0], images)


def test_download_progress_bar(tmp_path, site, capsys):
    with serving(site) as (base, _):
        load_emnist(
            "mnist", "test", data_dir=tmp_path / "cache", url=f"{base}/gzip.zip"
        )
    err = capsys.readouterr().err
    assert "downloading EMNIST" in err and "100%" in err and err.endswith("\n")


# What else a server could put into the archive; none of it may reach the disk.
HOSTILE = {
    "gzip/emnist-mnist-test-images-idx3-ubyte": idx_bytes(
        np.zeros((600, 28, 28), np.uint8)
    ),
    "gzip/emnist-mnist-test-labels-idx1-ubyte": idx_bytes(np.zeros(600, np.uint8)),
    "gzip/emnist-mnist-mapping.txt": "".join(
        f"{k} {57 - k}\n" for k in range(10)
    ).encode(),
    "gzip/.bashrc": b"echo owned\n",
    "gzip/../escaped.txt": b"one level up",
    "gzip/../../escaped.txt": b"two levels up",
    "../escaped.txt": b"outside",
    "/tmp/escaped-absolute.txt": b"absolute",
    "gzip/sub/emnist-mnist-test-images-idx3-ubyte.gz": b"nested",
    "gzip/emnist-mnist-test-images-idx3-ubyte.gz.part": b"a suffix",
}


def test_download_places_only_verified_official_files(tmp_path, mnist_files):
    """Before: every gzip/* member was written into the data folder, unverified, and a
    decompressed copy was then used. Now only the official names, each verified, reach
    the folder."""
    site = make_site(tmp_path / "site", {**HOSTILE, **members_of(mnist_files)})
    cache = tmp_path / "data" / "cache"
    with serving(site) as (base, _):
        images, labels, mapping = fetch(cache, f"{base}/gzip.zip")
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_files)
    # Neither the black copy nor the mapping
    assert images.any() and mapping == MAPPINGS["mnist"]
    x, y = sample_stored()
    assert np.array_equal(labels, y[y < 10])
    assert (
        not list(tmp_path.rglob("escaped*.txt"))
        and not Path("/tmp/escaped-absolute.txt").exists()
    )
    assert not list(tmp_path.rglob(".bashrc"))


@pytest.mark.parametrize(
    "name",
    [
        "gzip/..",
        "gzip/.",
        "gzip//",
        "gzip/../gzip/emnist-mnist-test-images-idx3-ubyte.gz",
    ],
)
def test_archive_members_with_dot_names(tmp_path, mnist_files, name):
    """Before: `gzip/..` made the extraction open a folder for writing
    (IsADirectoryError). Such names are not official names, so they are never turned
    into paths."""
    site = make_site(tmp_path / "site", {name: b"dots", **members_of(mnist_files)})
    cache = tmp_path / "cache"
    with serving(site) as (base, _):
        fetch(cache, f"{base}/gzip.zip")
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_files)
    assert all((cache / n).read_bytes() == c for n, c in mnist_files.items())


def test_an_archive_with_only_unverifiable_copies_places_nothing(tmp_path):
    """Decompressed copies, a mapping file, a dotfile: nothing to verify, so nothing is
    placed (before, all of them were, and load_emnist then used the decompressed
    copies)."""
    site = make_site(
        tmp_path / "site",
        {m: c for m, c in HOSTILE.items() if Path(m).name not in SHA256},
    )
    cache = tmp_path / "cache"
    with (
        serving(site) as (base, _),
        pytest.raises(DataError, match="no official file under gzip/"),
    ):
        fetch(cache, f"{base}/gzip.zip")
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("which", [0, 1])
def test_download_with_a_corrupted_member(tmp_path, mnist_files, which):
    members = members_of(mnist_files)
    bad = f"gzip/{MNIST_TEST[which]}"
    content = bytearray(members[bad])
    content[len(content) // 2] ^= 0x01
    members[bad] = bytes(content)
    site = make_site(tmp_path / "site", members)
    cache = tmp_path / "cache"
    with (
        serving(site) as (base, _),
        pytest.raises(DataError, match="checksum mismatch") as info,
    ):
        fetch(cache, f"{base}/gzip.zip")
    assert MNIST_TEST[which] in str(info.value)
    assert list(cache.iterdir()) == []  # nothing kept, not even the members that passed


def with_compression_method(archive: bytes, method: int) -> bytes:
    """A one-member zip with its compression method changed in the local and central
    headers."""
    b = bytearray(archive)
    for at in (b.find(b"PK\x03\x04") + 8, b.rfind(b"PK\x01\x02") + 10):
        b[at : at + 2] = method.to_bytes(2, "little")
    return bytes(b)


# An unassigned method; Deflate64, which zipfile lacks
@pytest.mark.parametrize("method", [77, 9])
def test_a_member_with_an_unknown_compression_method(tmp_path, mnist_files, method):
    """Before: NotImplementedError escaped. Now a DataError naming the member, and
    nothing placed."""
    name = MNIST_TEST[0]
    one = make_site(tmp_path / "one", {f"gzip/{name}": mnist_files[name]}) / "gzip.zip"
    site = tmp_path / "site"
    site.mkdir()
    (site / "gzip.zip").write_bytes(with_compression_method(one.read_bytes(), method))
    cache = tmp_path / "cache"
    with (
        serving(site) as (base, _),
        pytest.raises(DataError, match="cannot extract") as info,
    ):
        download_emnist(cache, url=f"{base}/gzip.zip", progress=False)
    assert f"gzip/{name}" in str(info.value)
    assert list(cache.iterdir()) == []


def test_an_encrypted_or_damaged_member(tmp_path, mnist_files):
    """Flag bit 0 (encrypted) makes zipfile raise RuntimeError; a bad CRC raises
    BadZipFile."""
    name = MNIST_TEST[1]
    archive = (
        make_site(tmp_path / "one", {f"gzip/{name}": mnist_files[name]}) / "gzip.zip"
    ).read_bytes()
    encrypted = bytearray(archive)
    for at in (encrypted.find(b"PK\x03\x04") + 6, encrypted.rfind(b"PK\x01\x02") + 8):
        encrypted[at] |= 1
    damaged = bytearray(archive)
    damaged[archive.find(mnist_files[name]) + 100] ^= (
        0xFF  # the stored bytes: the CRC no longer matches
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "encrypted.zip").write_bytes(bytes(encrypted))
    (site / "damaged.zip").write_bytes(bytes(damaged))
    with serving(site) as (base, _):
        for archive_name in ("encrypted.zip", "damaged.zip"):
            with pytest.raises(DataError, match=f"cannot extract gzip/{name}"):
                download_emnist(
                    tmp_path / "cache", url=f"{base}/{archive_name}", progress=False
                )
    assert list((tmp_path / "cache").iterdir()) == []


def test_member_size_limit(tmp_path, mnist_files):
    site = make_site(tmp_path / "site", members_of(mnist_files))
    cache = tmp_path / "cache"
    largest = max(len(c) for c in mnist_files.values())
    with serving(site) as (base, _):
        with pytest.raises(DataError, match="larger than max_member_bytes=") as info:
            download_emnist(
                cache,
                url=f"{base}/gzip.zip",
                progress=False,
                max_member_bytes=largest - 1,
            )
        assert list(cache.iterdir()) == []
        download_emnist(
            cache, url=f"{base}/gzip.zip", progress=False, max_member_bytes=largest
        )
    assert MNIST_TEST[0] in str(info.value)
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_files)


def test_member_size_limit_holds_when_the_directory_lies(tmp_path, mnist_files):
    """A member whose directory entry declares a small size: the bytes that come out are
    counted too (zipfile stops at the declared size and then fails on the CRC; either
    way nothing is placed)."""
    name = MNIST_TEST[0]
    archive = bytearray(
        (
            make_site(tmp_path / "one", {f"gzip/{name}": mnist_files[name]})
            / "gzip.zip"
        ).read_bytes()
    )
    for at in (archive.find(b"PK\x03\x04") + 22, archive.rfind(b"PK\x01\x02") + 24):
        # Uncompressed size: 1000 bytes
        archive[at : at + 4] = (1000).to_bytes(4, "little")
    site = tmp_path / "site"
    site.mkdir()
    (site / "gzip.zip").write_bytes(bytes(archive))
    with serving(site) as (base, _), pytest.raises(DataError):
        download_emnist(
            tmp_path / "cache",
            url=f"{base}/gzip.zip",
            progress=False,
            max_member_bytes=2000,
        )
    assert list((tmp_path / "cache").iterdir()) == []


class Scripted(http.server.BaseHTTPRequestHandler):
    """An answer written out: status 200, a Content-Length of `length` (none if None),
    then the bytes of `chunks()` until the client goes away."""

    length: int | None = None

    def log_message(self, *args):
        pass

    def chunks(self):
        return []

    def do_GET(self):
        self.server.requests.append(self.path)
        self.send_response(200)
        if self.length is not None:
            self.send_header("Content-Length", str(self.length))
        self.end_headers()
        with contextlib.suppress(OSError):
            for chunk in self.chunks():
                self.wfile.write(chunk)
                self.wfile.flush()
        self.close_connection = True


class Endless(Scripted):
    """Zeros, 64 KiB at a time, without a Content-Length."""

    def chunks(self):
        return (bytes(1 << 16) for _ in range(10_000))


class Trickle(Scripted):
    """Announces 1 MB and sends a byte every 20 ms: never idle long enough for a
    per-read timeout."""

    length = 10**6

    def chunks(self):
        for _ in range(1000):
            yield b"\0"
            time.sleep(0.02)


class Huge(Scripted):
    """Announces 2 GB and sends nothing."""

    length = 2 * 10**9


def test_download_size_limit(tmp_path):
    """A server that sends without end (no Content-Length) is stopped at max_bytes; one
    that announces more than max_bytes is refused before anything is read. Neither is
    retried."""
    cache = tmp_path / "cache"
    with (
        serving(tmp_path, Endless) as (base, requests),
        pytest.raises(DataError, match="max_bytes") as info,
    ):
        download_emnist(
            cache, url=f"{base}/gzip.zip", progress=False, max_bytes=1 << 20, retries=2
        )
    assert "sent more than" in str(info.value) and requests == ["/gzip.zip"]
    with (
        serving(tmp_path, Huge) as (base, requests),
        pytest.raises(DataError, match="announces"),
    ):
        download_emnist(cache, url=f"{base}/gzip.zip", progress=False)
    assert requests == ["/gzip.zip"] and list(cache.iterdir()) == []


def test_download_deadline(tmp_path):
    """A trickling server meets the total deadline, though no single read times out."""
    cache = tmp_path / "cache"
    start = time.monotonic()
    with (
        serving(tmp_path, Trickle) as (base, _),
        pytest.raises(DataError, match="deadline=0.5 s"),
    ):
        download_emnist(
            cache, url=f"{base}/gzip.zip", progress=False, timeout=5, deadline=0.5
        )
    assert time.monotonic() - start < 5, "the deadline did not bound the download"
    assert list(cache.iterdir()) == []


def flaky(failures: int, status: int, folder: Path):
    """A handler class serving `folder` that answers the first `failures` requests with
    `status`."""

    class Flaky(QuietHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            if len(self.server.requests) < failures:
                self.server.requests.append(self.path)
                self.send_error(status)
            else:
                super().do_GET()

    return Flaky


class FakeTime:
    """Stands in for convbook.data's `time` module: real clock, recorded sleeps."""

    def __init__(self):
        self.sleeps: list[float] = []

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        self.sleeps.append(seconds)


@pytest.mark.parametrize("status", [503, 429, 500, 408])
def test_transient_errors_are_retried_with_back_off(
    tmp_path, site, mnist_files, monkeypatch, status
):
    clock = FakeTime()
    monkeypatch.setattr(data, "time", clock)
    cache = tmp_path / "cache"
    with serving(site, flaky(2, status, site)) as (base, requests):
        download_emnist(
            cache, url=f"{base}/gzip.zip", progress=False, retries=3, backoff=0.5
        )
    assert requests == ["/gzip.zip"] * 3 and clock.sleeps == [0.5, 1.0]
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_files)


def test_retries_run_out(tmp_path, site, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(data, "time", clock)
    cache = tmp_path / "cache"
    with (
        serving(site, flaky(10, 503, site)) as (base, requests),
        pytest.raises(DataError, match=r"\(3 attempts\): HTTP Error 503"),
    ):
        download_emnist(
            cache, url=f"{base}/gzip.zip", progress=False, retries=2, backoff=2
        )
    assert requests == ["/gzip.zip"] * 3 and clock.sleeps == [2, 4]
    assert list(cache.iterdir()) == []


def test_retries_stop_at_the_deadline(tmp_path, site, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(data, "time", clock)
    with (
        serving(site, flaky(10, 503, site)) as (base, requests),
        pytest.raises(DataError, match="503"),
    ):
        download_emnist(
            tmp_path / "c",
            url=f"{base}/gzip.zip",
            progress=False,
            retries=5,
            backoff=100,
            deadline=60,
        )
    # Waiting 100 s would pass the deadline
    assert requests == ["/gzip.zip"] and clock.sleeps == []


@pytest.mark.parametrize("status", [404, 403, 501])
def test_permanent_errors_are_not_retried(tmp_path, site, monkeypatch, status):
    clock = FakeTime()
    monkeypatch.setattr(data, "time", clock)
    with (
        serving(site, flaky(10, status, site)) as (base, requests),
        pytest.raises(DataError, match=f"could not download.*{status}"),
    ):
        download_emnist(tmp_path / "c", url=f"{base}/gzip.zip", progress=False)
    assert requests == ["/gzip.zip"] and clock.sleeps == []


def test_download_of_a_web_page(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "gzip.zip").write_bytes(
        b"<!DOCTYPE html><html><title>Maintenance</title></html>"
    )
    cache = tmp_path / "cache"
    with (
        serving(site) as (base, requests),
        pytest.raises(DataError, match="did not return a zip archive"),
    ):
        fetch(cache, f"{base}/gzip.zip")
    assert list(cache.iterdir()) == [] and requests == ["/gzip.zip"]  # not retried


def test_download_404_and_refused_connection(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    with (
        serving(site) as (base, _),
        pytest.raises(DataError, match="could not download.*404"),
    ):
        fetch(tmp_path / "cache", f"{base}/gzip.zip")
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = FakeTime()
    monkeypatch.setattr(data, "time", clock)
    with pytest.raises(DataError, match=r"could not download.*\(2 attempts\)"):
        download_emnist(
            tmp_path / "cache",
            url=f"http://127.0.0.1:{port}/gzip.zip",
            progress=False,
            timeout=5,
            retries=1,
        )
    # A refused connection may be a server restarting: retried once
    assert clock.sleeps == [1.0]


def test_download_of_a_zip_without_the_files(tmp_path):
    wrong = make_site(tmp_path / "wrong", {"emnist/readme.txt": b"hello"})
    right = make_site(tmp_path / "right", {"gzip/emnist-mnist-mapping.txt": b"0 48\n"})
    for site in (wrong, right):
        with (
            serving(site) as (base, _),
            pytest.raises(DataError, match="no official file under gzip/"),
        ):
            fetch(tmp_path / f"{site.name}-cache", f"{base}/gzip.zip")
        assert list((tmp_path / f"{site.name}-cache").iterdir()) == []


def test_download_of_an_archive_without_the_wanted_split(tmp_path, publish):
    letters = publish(
        official_files("letters", "test", np.zeros((2, 28, 28), np.uint8), [1, 26])
    )
    site = make_site(tmp_path / "site", members_of(letters))
    cache = tmp_path / "cache"
    with (
        serving(site) as (base, _),
        pytest.raises(DataError, match="has no.*emnist-mnist-test-images"),
    ):
        fetch(cache, f"{base}/gzip.zip")
    # Verified, so kept for later
    assert sorted(p.name for p in cache.iterdir()) == sorted(letters)


def test_download_cut_short(tmp_path, site, monkeypatch):
    """The server promises the whole archive and closes the connection half-way:
    transient, retried, and reported with the byte counts when the retries run out."""
    body = (site / "gzip.zip").read_bytes()

    class CutShort(Scripted):
        length = len(body)

        def chunks(self):
            return [body[: len(body) // 2]]

    monkeypatch.setattr(data, "time", FakeTime())
    cache = tmp_path / "cache"
    with (
        serving(tmp_path, CutShort) as (base, requests),
        pytest.raises(
            DataError, match=f"closed after {len(body) // 2:,} of {len(body):,} bytes"
        ),
    ):
        fetch(cache, f"{base}/gzip.zip")
    # 1 + 3 retries
    assert requests == ["/gzip.zip"] * 4 and list(cache.iterdir()) == []


def test_download_from_a_file_url(tmp_path, site, mnist_files):
    """A copy of the archive on disk, through a file:// URL, is verified the same."""
    cache = tmp_path / "cache"
    images, _, _ = fetch(cache, (site / "gzip.zip").as_uri())
    assert (
        sorted(p.name for p in cache.iterdir()) == sorted(mnist_files) and images.any()
    )
    with pytest.raises(DataError, match="could not download"):
        fetch(tmp_path / "c2", (site / "none.zip").as_uri())


def test_download_files_argument(tmp_path, site, mnist_files):
    with serving(site) as (base, _):
        one = download_emnist(
            tmp_path / "one",
            url=f"{base}/gzip.zip",
            progress=False,
            files=[MNIST_TEST[1]],
        )
        assert [p.name for p in one.iterdir()] == [MNIST_TEST[1]]
        with pytest.raises(DataError, match="lacks.*emnist-letters-test-labels"):
            download_emnist(
                tmp_path / "two",
                url=f"{base}/gzip.zip",
                progress=False,
                files=[MNIST_TEST[1], "emnist-letters-test-labels-idx1-ubyte.gz"],
            )
    assert list((tmp_path / "two").iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"url": "ftp://example.org/gzip.zip"}, ValueError, "url must be"),
        ({"url": "gzip.zip"}, ValueError, "url must be"),
        ({"url": "http://[::1/"}, ValueError, "url"),
        ({"url": 3}, TypeError, "url must be a str"),
        ({"files": "emnist-mnist-test-images-idx3-ubyte.gz"}, TypeError, "files"),
        (
            {"files": ["gzip/emnist-mnist-test-images-idx3-ubyte.gz"]},
            ValueError,
            "files must be official",
        ),
        ({"files": []}, ValueError, "files must be official"),
        ({"timeout": "60"}, TypeError, "timeout"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"deadline": float("nan")}, ValueError, "deadline"),
        ({"max_bytes": 1.0}, TypeError, "max_bytes"),
        ({"max_member_bytes": 0}, ValueError, "max_member_bytes"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": True}, TypeError, "retries"),
        ({"backoff": -0.1}, ValueError, "backoff"),
        ({"data_dir": 7}, TypeError, "data_dir"),
    ],
)
def test_download_bad_arguments(tmp_path, kwargs, error, word):
    """Checked before anything is downloaded or created."""
    kwargs = {"data_dir": tmp_path / "cache", **kwargs}
    with pytest.raises(error, match=word) as info:
        download_emnist(kwargs.pop("data_dir"), **kwargs)
    assert not isinstance(info.value, DataError)
    assert not (tmp_path / "cache").exists()


def test_convbook_data_is_honoured(tmp_path, site, mnist_files, monkeypatch):
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("CONVBOOK_DATA", str(env_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == env_dir
    with serving(site) as (base, requests):
        images, _, _ = load_emnist(
            "mnist", "test", url=f"{base}/gzip.zip", progress=False
        )
    assert requests == ["/gzip.zip"] and images.shape == (600, 28, 28)
    assert sorted(p.name for p in env_dir.iterdir()) == sorted(mnist_files)
    assert not (tmp_path / "xdg").exists()
    readonly = write_files(tmp_path / "shared-copy", mnist_files)
    monkeypatch.setenv("CONVBOOK_DATA", str(readonly))  # a shared copy, no download
    images, _, _ = load_emnist("mnist", "test", download=False)
    assert images.shape == (600, 28, 28)


def test_default_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVBOOK_DATA", "~/emnist-here")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "home" / "emnist-here"
    monkeypatch.setenv("CONVBOOK_DATA", "")
    assert default_data_dir() == tmp_path / "xdg" / "convbook" / "emnist"
    monkeypatch.delenv("CONVBOOK_DATA")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "convbook" / "emnist"


# --------------------------------------------------------------------------------------
# The shipped sample


def test_sample_files_are_in_the_installed_package():
    assets = Path(str(importlib.resources.files("convbook"))) / "assets"
    assert assets == Path(convbook.__file__).parent / "assets" == SAMPLE_DIR
    files = sorted(p.name for p in assets.glob("*.bz2"))
    assert files == sorted(SAMPLE_SHA256)
    total = sum((assets / f).stat().st_size for f in files)
    assert total < 3_000_000, f"the sample is {total:,} bytes"
    for f in files:
        assert (
            hashlib.sha256((assets / f).read_bytes()).hexdigest() == SAMPLE_SHA256[f]
        ), f
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["convbook"]
    assert all(any(fnmatch(f"assets/{f}", p) for p in patterns) for f in files), (
        "not packaged"
    )


@pytest.mark.parametrize("subset, per_class", [("train", 240), ("test", 60)])
def test_load_sample(subset, per_class):
    images, labels, mapping = load_sample(subset)
    assert images.shape == (47 * per_class, 28, 28) and images.dtype == np.uint8
    assert (
        labels.dtype == np.int64
        and np.bincount(labels, minlength=47).tolist() == [per_class] * 47
    )
    assert mapping == MAPPINGS["bymerge"]
    stem = SAMPLE_DIR / f"emnist-bymerge-sample-{subset}"
    assert_upright(images, labels, mapping, Path(f"{stem}-images-idx3-ubyte.bz2"))
    raw_labels = parse_idx(
        bz2.decompress(Path(f"{stem}-labels-idx1-ubyte.bz2").read_bytes())
    )
    assert np.array_equal(labels, raw_labels)


def test_sample_is_drawn_from_the_bymerge_test_file(bymerge):
    images, labels, _, _ = bymerge
    labels_of: dict[bytes, set[int]] = {}
    for im, y in zip(images, labels.tolist()):
        labels_of.setdefault(im.tobytes(), set()).add(y)
    seen = set()
    for subset in ("train", "test"):
        x, y, _ = load_sample(subset)
        for im, label in zip(x, y.tolist()):
            assert label in labels_of.get(im.tobytes(), ()), (
                "a sample image is not in the ByMerge test file"
            )
            seen.add(im.tobytes())
    assert len(seen) == 47 * 300  # no image twice, in particular none in both parts


def test_rebuilding_the_sample_is_byte_identical(shared, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("CONVBOOK_DATA", None)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_emnist_sample.py"),
            "--source",
            str(shared),
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_SHA256)
    for name in SAMPLE_SHA256:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
    # The script prints the lines of the notebook's table: subset, kind, hash.
    expected = set()
    for name, h in SAMPLE_SHA256.items():
        subset, kind = name.removeprefix("emnist-bymerge-sample-").split("-")[:2]
        expected.add(f"{subset:<5} {kind} {h}")
    assert set(out.stdout.splitlines()) == expected


def test_damaged_sample_is_reported(tmp_path, monkeypatch):
    for name in SAMPLE_SHA256:
        shutil.copyfile(SAMPLE_DIR / name, tmp_path / name)
    flip_byte(tmp_path / "emnist-bymerge-sample-test-labels-idx1-ubyte.bz2", 100)
    monkeypatch.setattr(data, "SAMPLE_DIR", tmp_path)
    with pytest.raises(DataError, match="reinstall convbook") as info:
        load_sample("test")
    assert "emnist-bymerge-sample-test-labels-idx1-ubyte.bz2" in str(info.value)
    (tmp_path / "emnist-bymerge-sample-test-images-idx3-ubyte.bz2").unlink()
    with pytest.raises(DataError, match="missing: reinstall convbook"):
        load_sample("test")


@pytest.mark.parametrize(
    "subset, error", [("valid", ValueError), ("", ValueError), (None, TypeError)]
)
def test_load_sample_wrong_subset(subset, error):
    with pytest.raises(error, match="subset"):
        load_sample(subset)
