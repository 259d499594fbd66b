#!/usr/bin/env bash
# The second prepared GPU check, right after perf/device_check.sh on the same
# warm machine. Step limits sum to 250 s; call it with timeout_s 255. Under $OUT (default
# perf/results/device-check-dali), 6 files (a call returns at most 8):
#   compile.{md,json}          cold and warm compile of the training step, per-block regions
#                              (python -m perf.bench_compile: fresh inductor cache folders; warm = after
#                              loading the cold run's saved compile artifacts)
#   profile/results.{json,md}  compiled_fused and e2e_dali (DALI over generated 500x375 JPEGs, the
#                              compiled_fused model reused) in one run: the e2e/model-only ratio
#   log.txt, check.log         every step's output; each step's command, exit status and seconds
# DALI (~250 MiB of wheels; a call carries at most 64 MiB), on the CPU machine in the project root:
#   python /work/shared/tools/device_wheels.py dali --out .device-wheels/dali
# It prints one device call per part (carry [".device-wheels/dali/pN"], command `mkdir -p /tmp/parts
# && cp .device-wheels/dali/pN/* /tmp/parts/`): make them back to back for every part but the last,
# then carry the last part with this script, which joins /tmp/parts and the carried part:
# Device run: carry [".device-wheels/omegaconf", ".device-wheels/dali/pN"] (N: the last part),
# command `bash perf/device_check_dali.sh`, timeout_s 255. Without the DALI parts e2e_dali is
# recorded as skipped (DALI not installed) and the compile figures still come back.
# Rehearsal without a GPU: PYTHON=.venv/bin/python bash perf/device_check_dali.sh --device cpu
# (or --dry-run to list the steps; it writes nothing).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=perf/device_common.sh
. "$HERE/device_common.sh"
parse_args "$@"
check_only wheels dali_wheels env compile profile
OUT=${OUT:-perf/results/device-check-dali}
PY=${PYTHON:-python3}
prepare

if [ "$DEVICE" = cuda ]; then
  # bench_compile: cold (~60 s on an H100, target <= 90 s) and warm (target <= 15 s), each in a fresh process.
  COMPILE_ARGS=(--device cuda --arch resnet50 --image-size 224 --batch 256 --bn-group-size 32 --timeout 80)
  # 3 + 6 x 2 steps of 256 images: ~5,000 generated JPEGs (the default: enough for the timed steps).
  PERF_ARGS=(--warmup 3 --steps 6 --repeats 2 --budget-seconds 70 --compile-estimate-s 30 --workers 14)
else
  COMPILE_ARGS=(--device cpu --arch resnet18 --image-size 32 --batch 4 --bn-group-size 2 --steady 2)
  PERF_ARGS=(--device cpu --config smoke "${TINY_CPU[@]}" --warmup 2 --steps 2 --repeats 2 --budget-seconds 240
             --workers 2 --data-resolution 64x48 --data-images 64)
fi

step wheels 15 install_parts .device-wheels/omegaconf
step dali_wheels 35 install_parts /tmp/parts .device-wheels/dali
use_site
env_and_dali() {
  env_report
  "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI missing: e2e_dali will be skipped"
}
step env 10 env_and_dali
step compile 110 "$PY" -m perf.bench_compile "${COMPILE_ARGS[@]}" --scopes blocks --out "$OUT"
step profile 80 "$PY" -m perf --variants compiled_fused,e2e_dali "${PERF_ARGS[@]}" --no-plots --out "$OUT/profile" \
  --data-cache /tmp/densecl_jpegs
finish
