"""The repository is clean under ruff with the configuration in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str]:
    # The ruff of this environment (`pip install -e .[test]` installs it next to python), else one on PATH.
    here = Path(sys.executable).parent / "ruff"
    if here.is_file():
        return [str(here)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e .[test])")
    return [found]


def test_ruff_check_is_clean():
    cmd = [*ruff_command(), "check", "--no-cache", "--output-format", "concise", "."]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
