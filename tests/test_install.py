"""scripts/install.sh gives the project's environment its own DeepSpeed op cache, built once: no test subprocess
(and no training run) compiles an op inside its timeout, and no other environment on the machine invalidates it."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                                reason="checks the environment scripts/install.sh made (.venv)")


def test_deepspeed_ops_live_in_the_environment_and_are_built():
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    assert ext.resolve() == (REPO / ".venv" / "torch_extensions").resolve()
    if torch.cuda.is_available():
        pytest.skip("GPU machine: DeepSpeed builds its CUDA ops itself")
    for op in ("deepspeed_shm_comm", "cpu_adam"):
        assert (ext / op / f"{op}.so").is_file(), f"{op} not prebuilt: run scripts/install.sh"


def test_every_process_of_the_environment_builds_with_its_own_ninja(tmp_path):
    """torch builds ops with the first `ninja` on PATH; the venv's and a system one hash build commands differently,
    so without this a run from an activated venv and one without rebuilt the ops in turn (inside training runs)."""
    import shutil
    import subprocess

    venv_bin = REPO / ".venv" / "bin"
    if not (venv_bin / "ninja").exists():
        pytest.skip("no ninja in .venv/bin")
    # PATH as an unactivated shell has it: no .venv/bin
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    out = subprocess.run([str(venv_bin / "python"), "-c", "import shutil; print(shutil.which('ninja'))"],
                         env=dict(os.environ, PATH=path or "/usr/bin:/bin"), capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (venv_bin / "ninja").resolve(), (out.stdout, shutil.which("ninja"))
    stamp = REPO / ".venv" / "torch_extensions" / "built_with_ninja"
    if not torch.cuda.is_available():
        assert stamp.is_file() and Path(stamp.read_text().split()[0]).resolve() == (venv_bin / "ninja").resolve(), \
            "run scripts/install.sh"
