#!/usr/bin/env bash
# The prepared GPU check (issue 18), at most ~8 minutes on a fresh machine (H100, torch 2.11, Triton 3.6,
# no DALI or DeepSpeed there), compile included. Everything lands under $OUT (default
# perf/results/device-check):
#   profile/results.{json,md}  step variants mmselfsup_fp32_b32, eager_plain_bn, eager_bf16_cl_fused,
#                              compiled_plain_bn, compiled_fused: images/s, stages, peak memory, the
#                              same-run baseline ratios and the compile time of each compiled variant
#   kernel_tests.log           the whole of tests/test_kernels.py on the GPU
#   bench_kernels.log          python -m perf.bench_kernels (fused loss kernels vs eager vs compiled)
#   env.log, check.log         card, versions, commit; each step's command, exit status and seconds
# Then, on the same warm machine: perf/device_check_dali.sh (cold/warm compile, e2e_dali).
#
# Preparation, on the CPU machine (the device has no omegaconf):
#   echo /.whl/ >> .git/info/exclude   # in a worktree: the main repository's info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf antlr4-python3-runtime==4.9.3
# Device run: carry [".whl"], command `bash perf/device_check.sh`, timeout_s 500.
# Rehearsal without a GPU (same steps, tiny shapes, CUDA-only variants recorded as skipped):
#   PYTHON=.venv/bin/python bash perf/device_check.sh --device cpu
#   bash perf/device_check.sh --dry-run        # list the steps only
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=perf/device_common.sh
. "$HERE/device_common.sh"
parse_args "$@"
OUT=${OUT:-perf/results/device-check}
PY=${PYTHON:-python3}
prepare

VARIANTS=mmselfsup_fp32_b32,eager_plain_bn,eager_bf16_cl_fused,compiled_plain_bn,compiled_fused
if [ "$DEVICE" = cuda ]; then
  PERF_ARGS=(--warmup 3 --steps 8 --repeats 3 --budget-seconds 240 --compile-estimate-s 60)
  KERNEL_TESTS=("$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py)
  BENCH_KERNELS=("$PY" -m perf.bench_kernels)
else   # rehearsal: tiny shapes; the kernel tests are collected (the interpreter would take far longer)
  PERF_ARGS=(--device cpu --config smoke "${TINY_CPU[@]}" --warmup 2 --steps 2 --repeats 2 --budget-seconds 240
             --baseline-batch 4)
  KERNEL_TESTS=("$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_kernels.py)
  BENCH_KERNELS=("$PY" -m perf.bench_kernels --help)
fi

step profile 250 "$PY" -m perf --variants "$VARIANTS" "${PERF_ARGS[@]}" --no-plots --out "$OUT/profile"
step kernel_tests 130 "${KERNEL_TESTS[@]}"
step bench_kernels 75 "${BENCH_KERNELS[@]}"
finish
