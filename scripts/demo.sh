#!/usr/bin/env bash
# The embedded demo: gives a tiny text LLM eyes with VoRA on a synthetic shapes corpus, on CPU.
#   bash scripts/demo.sh                 # ≤ 10 min on 2 idle cores: corpus, stand-in LLM + teacher, stage 1, merge, held-out accuracy
#   bash scripts/demo.sh --fast          # ~2–2.5 min, lower bar
#   bash scripts/demo.sh --seed 0 1 2    # three seeds, each in demo_out/seed-S/, and their spread
#   bash scripts/demo.sh --no-distill | --attention causal | --lora-layers K    # ablations
#   bash scripts/demo.sh --compare       # default, --no-distill and --attention causal, one table
# Creates .venv on first use (torch==2.14.1 + torchvision==0.29.1 first, then `pip install -e .[test]`);
# later runs skip what is installed. Everything it writes goes to demo_out/ (or --out DIR); library warnings go to
# its logs/, not to the console. Prints the time of each stage and ends with one line: `demo: PASS …` or `demo: FAIL …`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/install.sh
echo "install: $((SECONDS - start)) s (.venv ready)"
# OpenMP threads that spin-wait make training several times slower when the 2 cores are shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
status=0
.venv/bin/python -m examples.demo "$@" || status=$?
echo "demo.sh: wall time $((SECONDS - start)) s including the install check; exit status $status"
exit $status
