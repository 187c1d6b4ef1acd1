#!/usr/bin/env bash
# README's test command: install (if needed), then every test on CPU: the unit tests and the end-to-end ones
# (`--all`; plain `pytest` runs the unit tests only, the quick edit-test loop). CUDA-only tests skip without a GPU.
# VENV / TRANSFORMERS: as scripts/install.sh (scripts/test_oldest.sh uses them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Two workers, one test file each at a time (--dist loadfile: a module's training world and its runs are built once).
# Most end-to-end time is process start-up and the DeepSpeed launcher (one core each), so two workers on 2 cores
# halve the suite's wall time (481 s against 946 s measured on a 2-core VM); each test's result does not depend on it.
exec "${VENV:-.venv}/bin/python" -m pytest -q --all -n 2 --dist loadfile "$@"
