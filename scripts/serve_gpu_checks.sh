#!/usr/bin/env bash
# The GPU checks for serving (README "Serve"), in one call, on a machine with CUDA and vLLM 0.33 installed:
#   bash scripts/serve_gpu_checks.sh [PYTHON]        # PYTHON: the vLLM environment's interpreter (default: python)
# 1. tests/test_vllm_cpu.py + tests/test_vllm_cuda.py: plugin, processor, vLLM == transformers (fp32 exact, bf16 within
#    tolerance), causal variant differs, refusal without is_mm_prefix_lm, `vllm serve` answering an OpenAI chat
#    request (about 6 engine starts, ~6 min on an H200);
# 2. scripts/bench_serve.py: vLLM VoRA (448² image) vs the bare LLM (same tokens) vs transformers.generate.
# The vLLM environment needs vora and its test dependencies beside vLLM; pip keeps vLLM's torch and transformers, which
# satisfy vora's bounds:  pip install "vllm==0.33.*" && pip install -e ".[test]"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
if ! "$PY" -c "import vllm, torch, vora, vora.lora, merge_tools.merge, pytest; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "serve_gpu_checks: error: $PY needs vllm, vora with its test extra and a CUDA device (pip install 'vllm==0.33.*' && pip install -e '.[test]')" >&2
  exit 2
fi
"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
status=0
PYTHONPATH=$PWD "$PY" -m pytest -q -rs --all tests/test_vllm_cpu.py tests/test_vllm_cuda.py || status=1
PYTHONPATH=$PWD "$PY" scripts/bench_serve.py --prompts 64 --image-size 448 --new-tokens 128 || status=1
exit $status
