#!/usr/bin/env bash
# Creates .venv (if missing) and installs vora into it. Used by scripts/demo.sh and scripts/test.sh.
# torch first and pinned: an unpinned torch (pulled by deepspeed) would fetch a different CUDA build,
# and timm needs a torchvision that matches torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! .venv/bin/python -c "import vora, pytest" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test]"
fi
