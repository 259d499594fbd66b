#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a device (15 minutes in all, start included):
# the kernel tests on the GPU, the kernel benchmark (one-pass vs two-pass vs eager vs compiled,
# with a sweep of the split count), then the step profile of the model-only variants. Writes
# under $OUT (or perf/results/device), so the device tool brings the logs and tables back
# (at most 8 files). About 7 minutes.
#
# Preparation, on the CPU machine (the device has no omegaconf):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf
# Then: device run with carry [".whl"] and command `bash perf/device_check.sh`, timeout ~480 s.
# (DALI for e2e_dali needs ~250 MiB of wheels carried in parts: ../shared/tools/device_wheels.py.)
set -uo pipefail
OUT=${OUT:-perf/results/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } 2>&1 | tee "$OUT/tests.log"

timeout 70 python3 -m pytest -q -m "not slow" tests/test_kernels.py tests/test_model.py -p no:cacheprovider 2>&1 \
  | tee -a "$OUT/tests.log" | tail -6
timeout 130 python3 -m perf.bench_kernels --sweep-splits 1,2,3,4,6,8 2>&1 | tee "$OUT/bench_kernels.md" | tail -40
timeout 250 python3 -m perf --variants mmselfsup_fp32_b32,eager_bf16_cl,eager_bf16_cl_fused,compiled,compiled_fused \
  --warmup 3 --repeats 3 --budget-seconds 235 --compile-estimate-s 90 --no-plots --out "$OUT/profile" 2>&1 \
  | tee "$OUT/profile.log" | tail -45
