#!/usr/bin/env bash
# The first prepared GPU check, one device call on a fresh machine (H100/H200,
# Python 3.12, torch 2.11, Triton 3.6, pytest with xdist and timeout; no omegaconf, DALI or
# DeepSpeed there). Step limits sum to 300 s; call it with timeout_s 310. Under $OUT (the device
# tool's folder; default perf/results/device-check), 4 files (a call returns at most 8):
#   profile/results.{json,md}  step variants mmselfsup_fp32_b32, eager_plain_bn, eager_bf16_cl_fused,
#                              compiled_plain_bn, compiled_fused: images/s, stages, peak memory, the
#                              same-run baseline ratios, each compiled variant's compile time and the
#                              fused variant's Triton JIT time
#   log.txt                    every step's output: versions and commit, the profile's progress, the
#                              kernel tests (tests/test_kernels.py and tests/test_group_bn.py, in
#                              parallel), python -m perf.bench_kernels (each row as it is measured)
#   check.log                  each step's command, exit status and seconds
# Then perf/device_check_dali.sh on the same warm machine (docs/profiling.md: the session's plan).
#
# Preparation, on the CPU machine, in the project root (the device has no omegaconf):
#   python /work/shared/tools/device_wheels.py omegaconf --out .device-wheels/omegaconf
#   (../shared/tools/... from the main checkout; it builds the antlr4 runtime, which has no wheel.)
# Device run: carry [".device-wheels/omegaconf"], command `bash perf/device_check.sh`, timeout_s 310.
# Rerun of failed steps only: `bash perf/device_check.sh --only kernel_tests,bench_kernels`.
# Rehearsal without a GPU (same steps, tiny shapes, CUDA-only variants recorded as skipped):
#   PYTHON=.venv/bin/python bash perf/device_check.sh --device cpu
#   bash perf/device_check.sh --dry-run        # list the steps only; writes nothing
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=perf/device_common.sh
. "$HERE/device_common.sh"
parse_args "$@"
check_only wheels env profile kernel_tests bench_kernels
OUT=${OUT:-perf/results/device-check}
PY=${PYTHON:-python3}
prepare

VARIANTS=mmselfsup_fp32_b32,eager_plain_bn,eager_bf16_cl_fused,compiled_plain_bn,compiled_fused
KERNEL_FILES=(tests/test_kernels.py tests/test_group_bn.py)
# xdist: the device has 16 cores; each worker JIT-compiles its tests' kernels (Triton's on-disk
# cache is shared). Without xdist (a CPU machine may lack it) the tests run in one process.
XDIST=(-n "$([ "$DEVICE" = cuda ] && echo 8 || echo 2)")
[ "$DRY" = 1 ] || "$PY" -c "import xdist" 2>/dev/null || XDIST=()
if [ "$DEVICE" = cuda ]; then
  # Budget 195 s of the profile's 205: two cold compiles (~60 s each on an H100) and the Triton JIT
  # of the fused kernels (15.8 s on an H200 before the grouped-BN kernels; 30 s set aside) are held
  # apart from the steady steps (perf/runner.py), which leaves ~30 s of steady shares for the five
  # variants after the ceiling measurement: ~6 s each, 1 + 2 + 18 steps of ~0.15 s and a cuDNN
  # autotuning first step.
  PERF_ARGS=(--warmup 3 --steps 6 --repeats 3 --budget-seconds 195 --compile-estimate-s 60)
  KERNEL_TESTS=("$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --timeout 45 "${KERNEL_FILES[@]}")
  # The compiled references of the loss pieces were measured on 2026-12-04 (perf/RESULTS.md).
  BENCH_KERNELS=("$PY" -m perf.bench_kernels --no-compile)
else   # rehearsal: tiny shapes; the kernel tests are collected (the interpreter would take far longer)
  PERF_ARGS=(--device cpu --config smoke "${TINY_CPU[@]}" --warmup 2 --steps 2 --repeats 2 --budget-seconds 240
             --baseline-batch 4)
  KERNEL_TESTS=("$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --collect-only "${KERNEL_FILES[@]}")
  BENCH_KERNELS=("$PY" -m perf.bench_kernels --help)
fi

step wheels 10 install_parts .device-wheels/omegaconf
use_site
step env 10 env_report
step profile 205 "$PY" -m perf --variants "$VARIANTS" "${PERF_ARGS[@]}" --no-plots --out "$OUT/profile"
step kernel_tests 50 "${KERNEL_TESTS[@]}"
step bench_kernels 25 "${BENCH_KERNELS[@]}"
finish
