#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a device (15 minutes in all): kernel and model
# tests on the GPU, the kernel and data benchmarks, then the profiling suite. Writes under $OUT
# (or perf/results/device), so the device tool brings the logs and tables back.
#
# Preparation, on the CPU machine (the device has no omegaconf and no DALI):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf antlr4-python3-runtime==4.9.3
#   python ../shared/tools/device_wheels.py dali      # optional: carries DALI in parts (see its output)
# Then: device run with carry [".whl"] and command `bash perf/device_check.sh`, timeout ~540 s.
set -uo pipefail
OUT=${OUT:-perf/results/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# At most 8 files come back from the device: the card goes into tests.log.
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; } | tee "$OUT/tests.log"

timeout 90 python3 -m pytest -q -x tests/test_kernels.py tests/test_model.py -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log" | tail -5
timeout 120 python3 perf/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.md" | tail -30
if python3 -c "import nvidia.dali" 2>/dev/null; then
  timeout 60 python3 perf/bench_data.py --device cuda --dtype bf16 2>&1 | tee "$OUT/bench_data.md" | tail -15
fi
timeout 270 python3 perf/profile.py --out "$OUT/profile" --budget-seconds 240 2>&1 | tee "$OUT/profile.log" | tail -40
