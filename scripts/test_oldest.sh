#!/usr/bin/env bash
# The whole suite on the oldest transformers that pyproject.toml allows (its `transformers>=X` bound), in its own
# environment (.venv-oldest, or VENV=DIR). CI runs the newest allowed release (scripts/test.sh); this keeps the lower
# bound honest: serving engines pin older releases (vLLM 0.33: transformers<5.21) and merged checkpoints load there.
#   bash scripts/test_oldest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(grep -oP '^\s*"transformers>=\K[0-9][0-9.]*' pyproject.toml) || {
  echo "test_oldest: error: pyproject.toml [project] dependencies have no \"transformers>=X...\" line to read the lower bound from" >&2
  exit 2
}
echo "test_oldest: transformers==$oldest"
export VENV=${VENV:-.venv-oldest} TRANSFORMERS="transformers==$oldest"
bash scripts/test.sh "$@"
