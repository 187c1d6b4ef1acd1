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
