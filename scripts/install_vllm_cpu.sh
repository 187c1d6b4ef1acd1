#!/usr/bin/env bash
# vLLM's CPU-side checks (tests/test_vllm_cpu.py: plugin registration, config flag, multimodal processor, chat
# rendering) in the training environment, without a GPU: vLLM 0.33.0 pins torch 2.14.0 and its CUDA stack, so it is
# installed without its dependencies over .venv's torch 2.14.1, plus the pure-Python packages its front end imports.
# Enough to import vLLM and run its processors, not its engine. For serving use a separate environment (README "Serve").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
"$PY" -m pip install -q --no-deps "vllm==0.33.0"
"$PY" -m pip install -q pyzmq msgspec urllib3 cbor2 aiohttp requests openai-harmony openai cloudpickle pybase64 \
    cachetools uvloop prometheus_client xgrammar fastapi partial_json_parser llguidance blake3
"$PY" -c "import torch, vllm; print('vllm', vllm.__version__, 'over torch', torch.__version__)"
