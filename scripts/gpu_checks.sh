#!/usr/bin/env bash
# The training-side GPU checks in one call (README "Performance"), for a machine with CUDA and this repository's
# environment (bash scripts/install.sh, or your own torch + pip install -e .[test]):
#   bash scripts/gpu_checks.sh [PYTHON]     # PYTHON: the interpreter to use (default: .venv/bin/python)
# 1. every CUDA test: masks on eager/sdpa/flex vs the dense reference, the flex BlockMask training step (fp32, bf16),
#    recompiles within a length bucket, no host sync in a training step (sync debug mode), bf16 training and
#    ZeRO-2/3 resume, cached generation;
# 2. scripts/bench_train.py at S and M (the VoRA step vs plain causal LoRA, MFU, peak memory; chunked CE off at S);
# 3. scripts/bench_packing.py on the GPU (useful tokens/s packed vs padded).
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_checks.log. Serving has its own: scripts/serve_gpu_checks.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
log=${OUT:+$OUT/gpu_checks.log}
run() { echo "+ $*"; "$@"; }
{
  "$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" || exit 2
  status=0
  run "$PY" -m pytest -q -rs --all tests/test_cuda.py tests/test_train_cuda.py tests/test_host_syncs.py \
      tests/test_generation.py -k "cuda" || status=1
  run "$PY" scripts/bench_train.py --shape S || status=1
  run "$PY" scripts/bench_train.py --shape S --no-chunked-ce || status=1
  run "$PY" scripts/bench_train.py --shape S --attn-implementation flex_attention --packing || status=1
  run "$PY" scripts/bench_train.py --shape M || status=1
  run "$PY" scripts/bench_packing.py --device cuda || status=1
  exit $status
} 2>&1 | tee ${log:-/dev/null}
exit "${PIPESTATUS[0]}"
