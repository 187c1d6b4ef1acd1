#!/usr/bin/env bash
# README's test command: install (if needed), then every test on CPU: the unit tests and the end-to-end ones
# (`--all`; plain `pytest` runs the unit tests only, the quick edit-test loop). CUDA-only tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q --all "$@"
