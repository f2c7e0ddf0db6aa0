"""Binder, as far as it can be tried here: a fresh virtual environment built from exactly the `pip:`
section of environment.yml (Python 3.11, as Binder has after conda), in which a chapter that uses
PyTorch and one that uses the shipped data sample run to the end. A drift between the Binder
environment and what the chapters import fails here, before a reader meets it.

The one adaptation: this machine reaches only the package registries, so pip is told not to retry
the PyTorch CPU index it cannot reach (`--retries 0`); the pinned torch then comes from the default
index, as the same version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.binder
ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = [
    "book/03_einsum.ipynb",
    "book/07a_data.ipynb",
]  # PyTorch; the shipped sample


def pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(
        d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d
    )


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory) -> Path:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("environment.yml asks for Python 3.11; this interpreter is another")
    env = tmp_path_factory.mktemp("binder") / "env"
    venv.create(env, with_pip=True)
    requirements = env.parent / "requirements.txt"
    requirements.write_text("\n".join(pip_section()) + "\n")
    pip = [str(env / "bin" / "python"), "-m", "pip"]
    subprocess.run(
        [*pip, "install", "--quiet", "--retries", "0", "-r", str(requirements)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return env


def test_the_environment_has_what_the_chapters_import(binder_env):
    code = (
        "import convbook, numpy, torch, matplotlib, tqdm, threadpoolctl, nbdev, myst_nb"
    )
    subprocess.run(
        [str(binder_env / "bin" / "python"), "-c", code], check=True, cwd="/"
    )


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_in_the_binder_environment(binder_env, chapter, tmp_path):
    """Each chapter runs there, as a copy outside this checkout (Binder opens the repository, but
    the chapter must not rely on files beside it), with nbdev's quick cells."""
    shutil.copy(ROOT / chapter, tmp_path / Path(chapter).name)
    shutil.copy(
        ROOT / "pyproject.toml", tmp_path / "pyproject.toml"
    )  # nbdev-test reads its config
    r = subprocess.run(
        [str(binder_env / "bin" / "nbdev-test"), str(tmp_path / Path(chapter).name)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{binder_env / 'bin'}:{os.environ['PATH']}"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
