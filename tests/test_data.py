"""The EMNIST data layer of chapter 7a: the IDX reader and its failures, mapping files, `load_emnist` on
the real EMNIST files, the download path against a local HTTP server, and the shipped sample.

Tests that need the official files take the `emnist_dir` fixture (conftest.py): they are skipped with a
reason where the files are absent, and CI (`--require-emnist`) makes their absence a failure.
References are independent of the package: IDX is parsed and written here with `gzip`, `bz2` and `struct`, hashes come from `hashlib`.
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
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

import convbook
import convbook.data as data
from convbook.data import (MAPPINGS, SAMPLE_DIR, SAMPLE_SHA256, SHA256, SPLITS, DataError, default_data_dir,
                           load_emnist, load_sample, read_idx, read_mapping, sha256)

ROOT = Path(__file__).resolve().parents[1]
MNIST_TEST = ("emnist-mnist-test-images-idx3-ubyte.gz", "emnist-mnist-test-labels-idx1-ubyte.gz")
BYMERGE_TEST = ("emnist-bymerge-test-images-idx3-ubyte.gz", "emnist-bymerge-test-labels-idx1-ubyte.gz")


@pytest.fixture(scope="session")
def shared(emnist_dir) -> Path:
    """The folder of real EMNIST files (conftest's `emnist_dir`: skipped where absent, required in CI)."""
    return emnist_dir


# ---------------------------------------------------------------------------------------------------
# Independent references: an IDX writer and parser written with struct, not with the package.

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
         np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
COMPRESS = {"": bytes, ".gz": gzip.compress, ".bz2": bz2.compress}


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding: 0, 0, type code, ndim, big-endian uint32 sizes, big-endian values in C order."""
    a = np.asarray(a)
    header = bytes([0, 0, CODES[a.dtype.newbyteorder("=")], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def parse_idx(raw: bytes) -> np.ndarray:
    """Reference parser for uint8 IDX bytes (what EMNIST uses)."""
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and code == 0x08
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def flip_byte(path: Path, position: int) -> None:
    b = bytearray(path.read_bytes())
    b[position] ^= 0xFF
    path.write_bytes(bytes(b))


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# read_idx: every corruption is a DataError that names the file

GOOD = idx_bytes(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
GZ_GOOD = gzip.compress(GOOD)
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
    "wrong magic: an HTML page": ("page.idx.gz", gzip.compress(b"<!DOCTYPE html><html></html>"), {}),
    "wrong ndim: labels read as images": ("labels.idx", idx_bytes(np.arange(4, dtype=np.uint8)),
                                          {"expect_ndim": 3}),
    "wrong ndim: images read as labels": ("images.idx", GOOD, {"expect_ndim": 1}),
    "truncated header": ("header.idx", GOOD[:11], {}),
    "empty file": ("empty.idx", b"", {}),
    "missing file": ("missing.idx", None, {}),
}


def write_case(folder: Path, case: str) -> tuple[Path, dict]:
    name, content, kwargs = CORRUPT[case]
    path = folder / name
    if content is not None:
        path.write_bytes(content)
    return path, kwargs


def assert_rejects(reader, path: Path, **kwargs) -> None:
    """`reader(path)` must raise DataError, and the message must name the file."""
    with pytest.raises(DataError) as info:
        reader(path, **kwargs)
    assert str(path) in str(info.value), f"the message does not name {path}: {info.value}"


@pytest.mark.parametrize("case", list(CORRUPT))
def test_read_idx_rejects_corruption(tmp_path, case):
    path, kwargs = write_case(tmp_path, case)
    assert_rejects(read_idx, path, **kwargs)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def sloppy_read_idx(path, *, expect_ndim=None):
    """A deliberately wrong reader: it trusts the header and ignores bytes beyond what it promises."""
    raw = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, count=int(np.prod(shape)), offset=4 + 4 * ndim).reshape(shape)


@pytest.mark.parametrize("case", ["extra bytes", "wrong ndim: images read as labels"])
def test_a_sloppy_reader_is_caught(tmp_path, case):
    """The assertions above are not vacuous: a reader without the length and ndim checks fails them."""
    path, kwargs = write_case(tmp_path, case)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        assert_rejects(sloppy_read_idx, path, **kwargs)


def test_read_idx_corrupt_gzip_body_is_data_error(tmp_path):
    """A byte flipped deep in a gzip stream is caught by gzip's CRC-32 and reported as DataError."""
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(GOOD * 50))
    flip_byte(path, path.stat().st_size // 2)
    assert_rejects(read_idx, path)


def test_read_idx_corrupt_deflate_block_is_data_error(tmp_path, shared):
    path = tmp_path / MNIST_TEST[0]
    shutil.copyfile(shared / MNIST_TEST[0], path)
    flip_byte(path, 100)
    assert_rejects(read_idx, path)


# ---------------------------------------------------------------------------------------------------
# read_mapping

def test_read_mapping_official_files(shared):
    assert read_mapping(shared / "emnist-balanced-mapping.txt") == MAPPINGS["balanced"]
    for split in ("bymerge", "byclass", "mnist", "letters"):
        assert read_mapping(shared / "partial" / f"emnist-{split}-mapping.txt") == MAPPINGS[split], split
    assert MAPPINGS["bymerge"] == MAPPINGS["balanced"]
    for split, n in SPLITS.items():
        assert len(MAPPINGS[split]) == n, split


def test_read_mapping_good_file(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("0 48\n\n1 49  \r\n  2 65 97\n")
    assert read_mapping(path) == {0: "0", 1: "1", 2: "Aa"}


@pytest.mark.parametrize("line", ["2 fifty", "7", "3 48.0", "x 48", "5 -1", "5 1114112"])
def test_read_mapping_malformed_line(tmp_path, line):
    path = tmp_path / "emnist-x-mapping.txt"
    path.write_text(f"0 48\n1 49\n{line}\n")
    with pytest.raises(DataError, match="line 3") as info:
        read_mapping(path)
    assert str(path) in str(info.value)


def test_read_mapping_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_mapping(tmp_path / "nothing.txt")


# ---------------------------------------------------------------------------------------------------
# load_emnist on the real files

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
    raw = parse_idx(gzip.decompress(raw_path.read_bytes()) if raw_path.suffix == ".gz"
                    else bz2.decompress(raw_path.read_bytes()))
    assert images.shape == raw.shape
    assert np.array_equal(images, raw.transpose(0, 2, 1)), "images are not the transposed stored arrays"


def assert_bar_on_top(images, labels, mapping) -> None:
    """Independent of the file: a '7' and a 'T' have their bar at the top, so the mean image has much
    more ink in rows 3..9 than in columns 3..9."""
    label_of = {c: k for k, c in mapping.items()}
    for c in "7T":
        if c in label_of:
            ratio = top_to_left_ink(images[labels == label_of[c]])
            assert ratio > 1.5, f"'{c}' has no bar at the top (top/left ink {ratio:.2f}): not upright"


def assert_upright(images, labels, mapping, raw_path: Path) -> None:
    assert_transposed_storage(images, raw_path)
    assert_bar_on_top(images, labels, mapping)


@pytest.fixture(scope="module")
def bymerge(shared):
    with sha256_spy() as calls:
        images, labels, mapping = load_emnist("bymerge", "test", data_dir=shared, download=False)
    return images, labels, mapping, calls


def test_bymerge_test_file(bymerge):
    images, labels, mapping, _ = bymerge
    assert images.shape == (116_323, 28, 28) and images.dtype == np.uint8 and images.flags.c_contiguous
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


def test_a_loader_that_forgets_the_transpose_is_caught(shared):
    """The orientation assertions are not vacuous: each one alone rejects images left as stored."""
    forgetful = read_idx(shared / MNIST_TEST[0], expect_ndim=3)  # as stored, not transposed
    labels = read_idx(shared / MNIST_TEST[1], expect_ndim=1)
    with pytest.raises(AssertionError, match="not the transposed stored arrays"):
        assert_transposed_storage(forgetful, shared / MNIST_TEST[0])
    with pytest.raises(AssertionError, match="not upright"):
        assert_bar_on_top(forgetful, labels, MAPPINGS["mnist"])


def test_mnist_test_file(shared):
    with sha256_spy() as calls:
        images, labels, mapping = load_emnist("mnist", "test", data_dir=shared, download=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    assert mapping == MAPPINGS["mnist"]
    assert sorted(calls) == sorted(shared / n for n in MNIST_TEST)
    assert_upright(images, labels, mapping, shared / MNIST_TEST[0])


def test_official_checksum_table(shared):
    files = sorted(shared.glob("emnist-*.gz"))
    assert len(files) >= 8
    for f in files:
        assert sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() == SHA256[f.name], f.name
    names = {f"emnist-{s}-{sub}-{k}.gz" for s in SPLITS for sub in ("train", "test")
             for k in ("images-idx3-ubyte", "labels-idx1-ubyte")}
    assert set(SHA256) == names


def test_label_only_files(shared):
    balanced = read_idx(shared / "emnist-balanced-test-labels-idx1-ubyte.gz", expect_ndim=1)
    assert np.bincount(balanced).tolist() == [400] * 47
    letters = read_idx(shared / "emnist-letters-test-labels-idx1-ubyte.gz", expect_ndim=1)
    assert letters.min() == 1 and np.bincount(letters)[1:].tolist() == [800] * 26
    assert set(np.unique(letters).tolist()) == set(MAPPINGS["letters"])


@pytest.fixture
def mnist_copy(shared, tmp_path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in MNIST_TEST:
        shutil.copyfile(shared / name, folder / name)
    return folder


@pytest.mark.parametrize("which", [0, 1])
def test_flipped_byte_fails_the_checksum(mnist_copy, which):
    path = mnist_copy / MNIST_TEST[which]
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_emnist("mnist", "test", data_dir=mnist_copy, download=False)
    assert str(path) in str(info.value)


def test_flipped_byte_without_verify_is_still_caught(mnist_copy):
    path = mnist_copy / MNIST_TEST[0]
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(DataError) as info:
        load_emnist("mnist", "test", data_dir=mnist_copy, download=False, verify=False)
    assert str(path) in str(info.value)


def test_missing_files_without_download(tmp_path, mnist_copy):
    with pytest.raises(DataError, match="not found") as info:
        load_emnist("mnist", "train", data_dir=mnist_copy, download=False)
    assert "emnist-mnist-train-images-idx3-ubyte.gz" in str(info.value) and str(mnist_copy) in str(info.value)
    (mnist_copy / MNIST_TEST[1]).unlink()
    with pytest.raises(DataError, match="labels-idx1") as info:
        load_emnist("mnist", "test", data_dir=mnist_copy, download=False)
    assert "images-idx3" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_emnist("mnist", "test", data_dir=tmp_path / "nowhere", download=False)


@pytest.mark.parametrize("split, subset, word", [("bymerg", "test", "split"), ("sample", "test", "split"),
                                                 ("mnist", "valid", "subset"), ("MNIST", "test", "split")])
def test_wrong_names(tmp_path, split, subset, word):
    with pytest.raises(ValueError, match=word) as info:
        load_emnist(split, subset, data_dir=tmp_path / "cache", url="http://127.0.0.1:9/none.zip")
    assert not isinstance(info.value, DataError)
    assert not (tmp_path / "cache").exists()  # nothing was touched


def test_layouts_gzip_folder_and_decompressed(shared, tmp_path):
    reference = load_emnist("mnist", "test", data_dir=shared, download=False)
    nested = tmp_path / "nested"
    (nested / "gzip").mkdir(parents=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in MNIST_TEST:
        shutil.copyfile(shared / name, nested / "gzip" / name)
        (flat / name.removesuffix(".gz")).write_bytes(gzip.decompress((shared / name).read_bytes()))
    for folder in (nested, flat):
        images, labels, _ = load_emnist("mnist", "test", data_dir=folder, download=False)
        assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


def test_images_and_labels_disagree(shared, tmp_path):
    shutil.copyfile(shared / MNIST_TEST[0], tmp_path / MNIST_TEST[0])
    shutil.copyfile(shared / "emnist-balanced-test-labels-idx1-ubyte.gz", tmp_path / MNIST_TEST[1])
    with pytest.raises(DataError, match="checksum mismatch"):
        load_emnist("mnist", "test", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match="disagree"):
        load_emnist("mnist", "test", data_dir=tmp_path, download=False, verify=False)


def test_labels_outside_the_mapping(tmp_path):
    (tmp_path / "emnist-mnist-test-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "emnist-mnist-test-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 9, 12], np.uint8)))
    with pytest.raises(DataError, match="outside the mnist mapping"):
        load_emnist("mnist", "test", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------------------------------------------
# The download path, for real, against a server on 127.0.0.1

@contextlib.contextmanager
def serving(folder: Path, handler_class=None):
    """Serve `folder` on 127.0.0.1 (a free port) in a thread; yield (base URL, list of requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    factory = handler_class or functools.partial(Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def official_members(shared: Path) -> dict[str, bytes]:
    """The official archive's layout with the real MNIST-test files, in the official order."""
    return {
        "gzip/emnist-mnist-mapping.txt": (shared / "partial" / "emnist-mnist-mapping.txt").read_bytes(),
        f"gzip/{MNIST_TEST[0]}": (shared / MNIST_TEST[0]).read_bytes(),
        f"gzip/{MNIST_TEST[1]}": (shared / MNIST_TEST[1]).read_bytes(),
    }


def make_site(folder: Path, members: dict[str, bytes], name: str = "gzip.zip") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_STORED) as z:
        z.writestr("gzip/", b"")  # the folder entry, as in the official archive
        for member, content in members.items():
            z.writestr(member, content)
    return folder


def test_download_verifies_and_loads(shared, tmp_path):
    site = make_site(tmp_path / "site", official_members(shared))
    cache = tmp_path / "cache"
    with serving(site) as (base, requests), sha256_spy() as calls:
        images, labels, mapping = load_emnist("mnist", "test", data_dir=cache, url=f"{base}/gzip.zip",
                                              progress=False)
    assert requests == ["/gzip.zip"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(Path(m).name for m in official_members(shared))
    for name in MNIST_TEST:
        assert any(p.name == name and p.parent != cache for p in calls), f"{name} not verified on download"
        assert cache / name in calls, f"{name} not verified on load"
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == SHA256[name]
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    reference = load_emnist("mnist", "test", data_dir=shared, download=False)
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])
    assert mapping == MAPPINGS["mnist"]
    with serving(site) as (base, requests):  # cached now: no second download
        again = load_emnist("mnist", "test", data_dir=cache, url=f"{base}/gzip.zip", progress=False)
    assert requests == [] and np.array_equal(again[0], images)


def test_download_progress_bar(shared, tmp_path, capsys):
    site = make_site(tmp_path / "site", official_members(shared))
    with serving(site) as (base, _):
        load_emnist("mnist", "test", data_dir=tmp_path / "cache", url=f"{base}/gzip.zip")
    err = capsys.readouterr().err
    assert "downloading EMNIST" in err and "100%" in err and err.endswith("\n")


@pytest.mark.parametrize("which", [0, 1])
def test_download_with_a_corrupted_member(shared, tmp_path, which):
    members = official_members(shared)
    bad = f"gzip/{MNIST_TEST[which]}"
    content = bytearray(members[bad])
    content[len(content) // 2] ^= 0x01
    members[bad] = bytes(content)
    site = make_site(tmp_path / "site", members)
    cache = tmp_path / "cache"
    with serving(site) as (base, _), pytest.raises(DataError, match="checksum mismatch") as info:
        load_emnist("mnist", "test", data_dir=cache, url=f"{base}/gzip.zip", progress=False)
    assert MNIST_TEST[which] in str(info.value)
    assert list(cache.iterdir()) == []  # nothing kept, not even the members that passed


def test_download_of_a_web_page(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "gzip.zip").write_bytes(b"<!DOCTYPE html><html><title>Maintenance</title></html>")
    cache = tmp_path / "cache"
    with serving(site) as (base, _), pytest.raises(DataError, match="did not return a zip archive"):
        load_emnist("mnist", "test", data_dir=cache, url=f"{base}/gzip.zip", progress=False)
    assert list(cache.iterdir()) == []


def test_download_404_and_refused_connection(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    with serving(site) as (base, _), pytest.raises(DataError, match="could not download.*404"):
        load_emnist("mnist", "test", data_dir=tmp_path / "cache", url=f"{base}/gzip.zip", progress=False)
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="could not download"):
        data.download_emnist(tmp_path / "cache", url=f"http://127.0.0.1:{port}/gzip.zip", progress=False,
                             timeout=5)


def test_download_of_a_zip_without_the_files(shared, tmp_path):
    wrong = make_site(tmp_path / "wrong", {"emnist/readme.txt": b"hello"})
    right = make_site(tmp_path / "right", {"gzip/emnist-mnist-mapping.txt": b"0 48\n"})
    with serving(wrong) as (base, _), pytest.raises(DataError, match="no gzip/ folder"):
        load_emnist("mnist", "test", data_dir=tmp_path / "c1", url=f"{base}/gzip.zip", progress=False)
    with serving(right) as (base, _), pytest.raises(DataError, match="has no mnist/test files"):
        load_emnist("mnist", "test", data_dir=tmp_path / "c2", url=f"{base}/gzip.zip", progress=False)


def test_download_cut_short(shared, tmp_path):
    """The server promises the whole archive and closes the connection half-way."""
    archive = make_site(tmp_path / "site", official_members(shared)) / "gzip.zip"
    body = archive.read_bytes()

    class CutShort(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True

    cache = tmp_path / "cache"
    with serving(tmp_path, CutShort) as (base, _), pytest.raises(DataError):
        load_emnist("mnist", "test", data_dir=cache, url=f"{base}/gzip.zip", progress=False)
    assert list(cache.iterdir()) == []


def test_convbook_data_is_honoured(shared, tmp_path, monkeypatch):
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("CONVBOOK_DATA", str(env_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == env_dir
    site = make_site(tmp_path / "site", official_members(shared))
    with serving(site) as (base, requests):
        images, _, _ = load_emnist("mnist", "test", url=f"{base}/gzip.zip", progress=False)
    assert requests == ["/gzip.zip"] and images.shape == (10_000, 28, 28)
    assert sorted(p.name for p in env_dir.iterdir()) == sorted(Path(m).name for m in official_members(shared))
    assert not (tmp_path / "xdg").exists()
    monkeypatch.setenv("CONVBOOK_DATA", str(shared))  # a shared read-only copy, no download
    images, _, _ = load_emnist("mnist", "test", download=False)
    assert images.shape == (10_000, 28, 28)


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


# ---------------------------------------------------------------------------------------------------
# The shipped sample

def test_sample_files_are_in_the_installed_package():
    assets = Path(str(importlib.resources.files("convbook"))) / "assets"
    assert assets == Path(convbook.__file__).parent / "assets" == SAMPLE_DIR
    files = sorted(p.name for p in assets.glob("*.bz2"))
    assert files == sorted(SAMPLE_SHA256)
    total = sum((assets / f).stat().st_size for f in files)
    assert total < 3_000_000, f"the sample is {total:,} bytes"
    for f in files:
        assert hashlib.sha256((assets / f).read_bytes()).hexdigest() == SAMPLE_SHA256[f], f
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["convbook"]
    assert all(any(fnmatch(f"assets/{f}", p) for p in patterns) for f in files), "not packaged"


@pytest.mark.parametrize("subset, per_class", [("train", 240), ("test", 60)])
def test_load_sample(subset, per_class):
    images, labels, mapping = load_sample(subset)
    assert images.shape == (47 * per_class, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=47).tolist() == [per_class] * 47
    assert mapping == MAPPINGS["bymerge"]
    stem = SAMPLE_DIR / f"emnist-bymerge-sample-{subset}"
    assert_upright(images, labels, mapping, Path(f"{stem}-images-idx3-ubyte.bz2"))
    raw_labels = parse_idx(bz2.decompress(Path(f"{stem}-labels-idx1-ubyte.bz2").read_bytes()))
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
            assert label in labels_of.get(im.tobytes(), ()), "a sample image is not in the ByMerge test file"
            seen.add(im.tobytes())
    assert len(seen) == 47 * 300  # no image twice, in particular none in both parts


def test_rebuilding_the_sample_is_byte_identical(shared, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CONVBOOK_DATA", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_emnist_sample.py"), "--source", str(shared),
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_SHA256)
    for name in SAMPLE_SHA256:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
        assert f'"{name}": "{SAMPLE_SHA256[name]}",' in out.stdout


def test_damaged_sample_is_reported(tmp_path, monkeypatch):
    for name in SAMPLE_SHA256:
        shutil.copyfile(SAMPLE_DIR / name, tmp_path / name)
    flip_byte(tmp_path / "emnist-bymerge-sample-test-labels-idx1-ubyte.bz2", 100)
    monkeypatch.setattr(data, "SAMPLE_DIR", tmp_path)
    with pytest.raises(DataError, match="reinstall convbook") as info:
        load_sample("test")
    assert "emnist-bymerge-sample-test-labels-idx1-ubyte.bz2" in str(info.value)


def test_load_sample_wrong_subset():
    with pytest.raises(ValueError, match="subset"):
        load_sample("valid")
