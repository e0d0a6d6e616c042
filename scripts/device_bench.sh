#!/usr/bin/env bash
# On the GPU machine, in one call (after scripts/device_env.sh's set-up could run): the bench of one
# model, then GPU tests (the pipeline's by default) with the seconds left, everything under $OUT. The bench's
# breakdown and logs are packed into bench-<model>.tgz, since the call brings back only a shallow
# tree of files under $OUT.
#   MODEL=3b CONFIGS=bound,offload-uva,hetero-pp2 DEADLINE=360 TOTAL=575 \
#     GPUTESTS="pipeline_gives and llama-pp2-auto" bash scripts/device_bench.sh
# MODEL, CONFIGS: bench/run.py's --models and --configs; DEADLINE: the bench's --deadline (s);
# MIN_RUN: the bench's --min-run (s; its default 120 skips a 1B run that needs about 60);
# TOTAL: seconds for the whole script, the GPU tests get what the bench left (skipped under 60 s);
# GPUTESTS: a pytest -k expression (empty: no GPU tests; "all": every test of the files);
# GPUTEST_FILES: the test files it selects from (default tests/gpu/test_pipeline.py; test_plugin.py needs the
# package installed, see its docstring).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?the output folder of the call}" "${MODEL:?e.g. 3b}" "${CONFIGS:?e.g. offload-uva,hetero-pp2}"
eval "$(bash scripts/device_env.sh)"
export HETERO_SHIM_CPU_KERNELS=${HETERO_SHIM_KERNELS_DIR:-}
{ date -u; nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)|NUMA node|L3"; } > "$OUT/host.txt" 2>&1
echo "bench start $(date -u +%T)" >> "$OUT/times.txt"
python3 bench/run.py --size full --models "$MODEL" --configs "$CONFIGS" --budget-ratio 1.5 --breakdown \
  --model-cache /tmp/hsbench/models --out "$OUT/bench-$MODEL" --deadline "${DEADLINE:-540}" --no-plot \
  ${MIN_RUN:+--min-run "$MIN_RUN"} \
  > "$OUT/bench-$MODEL.log" 2>&1
(cd "$OUT" && tar czf "bench-$MODEL.tgz" "bench-$MODEL" && rm -rf "bench-$MODEL/breakdown" "bench-$MODEL/logs")
left=$(( ${TOTAL:-575} - SECONDS ))
echo "gpu tests start $(date -u +%T), $left s left" >> "$OUT/times.txt"
if [ -n "${GPUTESTS:-}" ] && [ "$left" -gt 60 ]; then
  select=(-k "$GPUTESTS"); [ "$GPUTESTS" = all ] && select=()
  # shellcheck disable=SC2086  # the file list is meant to split
  timeout "$left" python3 -m pytest -q ${GPUTEST_FILES:-tests/gpu/test_pipeline.py} "${select[@]}" --gpu-stage-orders auto \
    --gpu-out "$OUT/gpu" --gpu-ref-cache /tmp/hs_gpu_refs > "$OUT/gputests.log" 2>&1
  echo "rc=$?" >> "$OUT/gputests.log"
  (cd "$OUT" && [ -d gpu ] && tar czf gpu.tgz gpu && rm -rf gpu)
fi
echo "end $(date -u +%T)" >> "$OUT/times.txt"
grep -E "^-- " "$OUT/bench-$MODEL.log"
grep -A3 "^speed-up" "$OUT/bench-$MODEL.log"
grep -E "pipeline (1|16) tok x" "$OUT/bench-$MODEL.log"
tail -3 "$OUT/gputests.log" 2>/dev/null
true
