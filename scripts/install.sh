#!/usr/bin/env bash
# Creates .venv (if missing) and installs vora into it. Used by scripts/demo.sh and scripts/test.sh.
# VENV=DIR installs into DIR instead; TRANSFORMERS=REQ (e.g. transformers==5.17.0) pins transformers there
# (scripts/test_oldest.sh: the suite on the oldest transformers pyproject.toml allows).
# torch first and pinned: an unpinned torch (pulled by deepspeed) would fetch a different CUDA build,
# and timm needs a torchvision that matches torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! "$VENV/bin/python" -c "import vora, pytest, xdist" 2>/dev/null; then
  "$VENV/bin/pip" install -q -e ".[test]"
fi
if [ -n "${TRANSFORMERS:-}" ]; then
  "$VENV/bin/pip" install -q "$TRANSFORMERS"
fi
# DeepSpeed JIT-compiles its C++ ops on first use. By default they go to ~/.cache/torch_extensions, shared by every
# environment on the machine (another venv's build forces a rebuild, minutes on a busy machine, inside whatever
# first needs them). This environment gets its own cache, set for every process that runs its Python (a .pth
# line), and on a machine without a GPU the two CPU ops the tests and the demo use are built now, once.
# The same line puts .venv/bin first on PATH, as `source .venv/bin/activate` does: torch builds with the first
# `ninja` on PATH, and the venv's ninja (1.13) and a system one (1.11) hash build commands differently, so runs with
# and without the venv activated rebuilt the ops in turn (a minute each, inside a training run).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ext_dir="$VENV/torch_extensions"
bin_dir="$VENV/bin"
echo "import os; os.environ.setdefault('TORCH_EXTENSIONS_DIR', '$ext_dir'); os.environ['PATH'] = os.pathsep.join(['$bin_dir'] + [p for p in os.environ.get('PATH', '').split(os.pathsep) if p and p != '$bin_dir'])" > "$site/vora_torch_extensions.pth"
# Rebuilt when missing or when the ninja that builds them changed (an environment made before the PATH line above).
stamp="$ext_dir/built_with_ninja"
ninja_now=$("$VENV/bin/python" -c "import shutil, subprocess; n = shutil.which('ninja'); print(n, subprocess.run([n, '--version'], capture_output=True, text=True).stdout.strip() if n else '')")
if [ ! -f "$ext_dir/deepspeed_shm_comm/deepspeed_shm_comm.so" ] || [ ! -f "$ext_dir/cpu_adam/cpu_adam.so" ] \
   || [ "$(cat "$stamp" 2>/dev/null)" != "$ninja_now" ]; then
  echo "install: building DeepSpeed's CPU ops into $ext_dir (once)"
  if "$VENV/bin/python" - > "$VENV/torch_extensions.log" 2>&1 <<'PY'
import torch

if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):  # gloo shared-memory comm; DeepSpeedCPUAdam (offload)
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
PY
  then echo "$ninja_now" > "$stamp"
  else echo "install: building DeepSpeed's CPU ops failed: see $VENV/torch_extensions.log" >&2; exit 1; fi
fi
