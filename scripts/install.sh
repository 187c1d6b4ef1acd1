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
# DeepSpeed JIT-compiles its C++ ops on first use. By default they go to ~/.cache/torch_extensions, shared by every
# environment on the machine (another venv's build forces a rebuild, minutes on a busy machine, inside whatever
# first needs them). This environment gets its own cache, set for every process that runs its Python (a .pth
# line), and on a machine without a GPU the two CPU ops the tests and the demo use are built now, once.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ext_dir="$PWD/.venv/torch_extensions"
echo "import os; os.environ.setdefault('TORCH_EXTENSIONS_DIR', '$ext_dir')" > "$site/vora_torch_extensions.pth"
if [ ! -f "$ext_dir/deepspeed_shm_comm/deepspeed_shm_comm.so" ] || [ ! -f "$ext_dir/cpu_adam/cpu_adam.so" ]; then
  echo "install: building DeepSpeed's CPU ops into $ext_dir (once)"
  if .venv/bin/python - > .venv/torch_extensions.log 2>&1 <<'PY'
import torch

if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):  # gloo shared-memory comm; DeepSpeedCPUAdam (offload)
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
PY
  then :; else echo "install: building DeepSpeed's CPU ops failed: see .venv/torch_extensions.log" >&2; exit 1; fi
fi
