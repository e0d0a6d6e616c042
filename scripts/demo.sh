#!/usr/bin/env bash
# The demo: set everything up, then generate with vLLM in heterogeneous mode and print the
# text and the rank plan next to a stock TP=1 run on the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
