"""scripts/bench_train.py --shape tiny runs end to end on CPU and prints its table (figures are not checked:
speed targets live in the benchmark, not in timed tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_reports_its_table():
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--shape", "tiny", "--device", "cpu",
         "--warmup", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for row in ("| VoRA step (a)", "| plain causal LoRA (b)", "ratio (a)/(b):", "| mask", "| teacher", "| LLM forward",
                "| distillation", "| loss", "| backward", "| optimizer"):
        assert row in out, f"{row!r} missing from:\n{out}"
    header = next(line for line in out.splitlines() if line.startswith("| run"))
    for col in ("ms/step", "tokens/s", "images/s", "peak", "MFU"):
        assert col in header
