"""The package as users get it: NumPy only, no torch at import, a wheel that works in a bare venv,
and a Binder environment that matches pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(names) -> dict[str, Requirement]:
    reqs = {}
    for extra in names:
        for line in PYPROJECT["project"]["optional-dependencies"][extra]:
            r = Requirement(line)
            if r.name != "convbook":  # self-references such as convbook[notebooks]
                reqs[r.name.lower()] = r
    return reqs


def test_runtime_dependency_is_numpy_only():
    assert [Requirement(r).name for r in PYPROJECT["project"]["dependencies"]] == [
        "numpy"
    ]


def test_torch_is_pinned():
    assert str(_requirements(["notebooks"])["torch"].specifier) == "==2.13.0"


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(
        d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d
    )
    listed = {}
    for line in pip:
        if line.startswith("-e") or line.startswith("--"):
            continue
        r = Requirement(line)
        listed[r.name.lower()] = r
    assert any(line.strip() in ("-e .", "-e ./") for line in pip), (
        "environment.yml must install the package itself"
    )
    needed = _requirements(["notebooks", "book"])
    needed["numpy"] = Requirement(PYPROJECT["project"]["dependencies"][0])
    missing = sorted(set(needed) - set(listed))
    assert not missing, f"environment.yml lacks {missing}"
    drift = {
        n: (str(listed[n].specifier), str(r.specifier))
        for n, r in needed.items()
        if listed[n].specifier != r.specifier
    }
    assert not drift, f"environment.yml and pyproject.toml pin differently: {drift}"
    py = next(
        d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")
    )
    minimum = PYPROJECT["project"]["requires-python"].lstrip(">=")
    assert tuple(map(int, py.split("=")[-1].split("."))) >= tuple(
        map(int, minimum.split("."))
    )


def test_import_does_not_pull_torch_or_matplotlib():
    code = "import sys, convbook; print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """An sdist and a wheel built from it by `python -m build` (the way a release is built)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (whl,) = dist.glob("convbook-*.whl")
    return whl


def test_sdist_contents(dist):
    import tarfile

    (sdist,) = dist.glob("convbook-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "convbook/conv.py",
        "convbook/fast.py",
    ):
        assert needed in names, needed
    assert (
        len(
            [n for n in names if n.startswith("convbook/assets/emnist-bymerge-sample-")]
        )
        == 4
    )


def test_wheel_contents(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "convbook/conv.py" in names and "convbook/windows.py" in names
    samples = [
        n for n in names if n.startswith("convbook/assets/emnist-bymerge-sample-")
    ]
    assert len(samples) == 4, samples
    assert not [
        n for n in names if n.endswith(".ipynb") or n.startswith(("tests/", "book/"))
    ]


def test_wheel_works_with_numpy_only(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "numpy", str(wheel)], check=True
    )
    freeze = subprocess.run(
        [py, "-m", "pip", "freeze"], check=True, capture_output=True, text=True
    ).stdout
    installed = sorted(
        re.split(r"[=@ ]", line)[0].lower() for line in freeze.splitlines() if line
    )
    assert installed == ["convbook", "numpy"], installed
    code = """
import numpy as np, convbook
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
y = convbook.conv2d(x, w, stride=2, padding=1)
assert y.shape == (2, 5, 5, 4) and y.dtype == np.float32
assert np.allclose(y, convbook.conv2d(x, w, stride=2, padding=1, method="naive"), atol=1e-4)
dy = rng.standard_normal(y.shape).astype(np.float32)
dx, dw, db = convbook.conv2d_backward(dy, x, w, stride=2, padding=1)
rx, rw, rb = convbook.conv2d_backward(dy, x, w, stride=2, padding=1, method="naive")
assert np.allclose(dx, rx, atol=1e-4) and np.allclose(dw, rw, atol=1e-3) and np.allclose(db, rb, atol=1e-4)
assert convbook.conv_transpose2d(y, w, stride=2, padding=1).shape[1:3] == (9, 9)
assert convbook.max_pool2d(x, 2).shape == (2, 4, 4, 3)
images, labels, mapping = convbook.load_sample("test")
assert images.shape == (2820, 28, 28) and images.dtype == np.uint8 and len(mapping) == 47
net = convbook.emnist_cnn()
assert net.forward(images[:2, :, :, None].astype(np.float32) / 255).shape == (2, 47)
print(convbook.__version__)
"""
    out = subprocess.run(
        [py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert out.strip() == PYPROJECT_VERSION


PYPROJECT_VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "convbook" / "__init__.py").read_text()
).group(1)


def test_installed_metadata_and_entry_points(wheel, tmp_path):
    """What `pip show` and PyPI display: summary, licence, URLs, classifiers; the console script
    runs; the benchmark explains that it needs PyTorch instead of failing with a traceback."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # a current pip: older ones (23.x) do not display a PEP 639 licence expression
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True
    )
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "numpy", str(wheel)], check=True
    )
    show = subprocess.run(
        [py, "-m", "pip", "show", "--verbose", "convbook"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Summary: Convolutional layers built from scratch in NumPy" in show
    assert "License-Expression: Apache-2.0" in show
    assert "  Homepage, https://github.com/convbook/convbook\n" in show
    assert "Classifiers:\n" in show and "  Topic :: Education\n" in show
    help_ = subprocess.run(
        [env_dir / "bin" / "convbook-train", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "EMNIST" in help_.stdout
    bench = subprocess.run(
        [py, "-m", "convbook.bench"], capture_output=True, text=True, cwd=tmp_path
    )
    assert (
        bench.returncode == 1
        and "PyTorch" in bench.stderr
        and "Traceback" not in bench.stderr
    )
