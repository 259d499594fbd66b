#!/usr/bin/env bash
# The second prepared GPU check (issue 18), run right after perf/device_check.sh on the same warm
# machine (/tmp/site with omegaconf is still there), at most ~8 minutes. Under $OUT (default
# perf/results/device-check-dali):
#   compile.{md,json}          cold and warm compile of the training step, per-block regions
#                              (python -m perf.bench_compile: fresh inductor cache folders; warm = after
#                              loading the cold run's saved compile artifacts)
#   profile/results.{json,md}  compiled_fused and e2e_dali (DALI over generated 500x375 JPEGs, the
#                              compiled_fused model reused) in one run: the e2e/model-only ratio
#   env.log, check.log, *.log
# DALI: ../shared/tools/device_wheels.py dali packs its wheels in parts under .device-wheels/pN;
# copy each part to /tmp/parts with back-to-back device calls (the script prints them), then run
# this script in the next call: it unpacks and installs the parts. Without them e2e_dali is
# recorded as skipped (DALI not installed) and the compile figures still come back.
# Device run: carry [".whl"], command `bash perf/device_check_dali.sh`, timeout_s 500.
# Rehearsal without a GPU: PYTHON=.venv/bin/python bash perf/device_check_dali.sh --device cpu
# (or --dry-run to list the steps).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=perf/device_common.sh
. "$HERE/device_common.sh"
parse_args "$@"
OUT=${OUT:-perf/results/device-check-dali}
PY=${PYTHON:-python3}
prepare

PARTS=${DALI_PARTS:-/tmp/parts}
if [ "$DRY" = 1 ] || ls "$PARTS"/part* >/dev/null 2>&1; then
  step install_dali 90 bash -c "rm -rf /tmp/w && mkdir -p /tmp/w && cat $PARTS/part* | tar x -C /tmp/w \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step dali_import 30 "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)"

if [ "$DEVICE" = cuda ]; then
  COMPILE_ARGS=(--device cuda --arch resnet50 --image-size 224 --batch 256 --bn-group-size 32)
  PERF_ARGS=(--warmup 3 --steps 8 --repeats 3 --budget-seconds 250 --compile-estimate-s 60 --workers 14)
else
  COMPILE_ARGS=(--device cpu --arch resnet18 --image-size 32 --batch 4 --bn-group-size 2 --steady 2)
  PERF_ARGS=(--device cpu --config smoke "${TINY_CPU[@]}" --warmup 2 --steps 2 --repeats 2 --budget-seconds 240
             --workers 2 --data-resolution 64x48 --data-images 64)
fi
step compile 160 "$PY" -m perf.bench_compile "${COMPILE_ARGS[@]}" --scopes blocks --out "$OUT"
step profile 260 "$PY" -m perf --variants compiled_fused,e2e_dali "${PERF_ARGS[@]}" --no-plots --out "$OUT/profile" \
  --data-cache /tmp/densecl_jpegs
finish
