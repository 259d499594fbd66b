#!/usr/bin/env bash
# One prepared GPU check of launch/reproduce.py (device tool, ~5 min): the seed recipe (ResNet-50,
# batch 256, bf16, Triton kernels) on the built-in data set, with a 3-minute budget (the timing probe gets 25% of it) and the MoCo-v2
# baseline; the report, plots, state and log come back under $OUT.
# Preparation on the CPU machine: the omegaconf wheel part (perf/device_check.sh's header:
# ../shared/tools/device_wheels.py omegaconf --out .device-wheels/omegaconf, antlr4 built there);
# then: device run with carry [".device-wheels/omegaconf"], command `bash perf/repro_device_check.sh`, timeout ~480 s.
set -uo pipefail
OUT=${OUT:-runs/repro_device}
mkdir -p "$OUT"
if ls .device-wheels/omegaconf/p*/part* >/dev/null 2>&1; then
  rm -rf /tmp/w && mkdir -p /tmp/w && cat .device-wheels/omegaconf/p*/part* | tar x -C /tmp/w \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse HEAD 2>/dev/null; } | tee "$OUT/repro.log"
R=/tmp/repro_gpu
rm -rf "$R"
timeout -k 10 400 python3 launch/reproduce.py --data synthetic --budget 3m --baseline --out "$R" \
    data.synthetic_images=1024 data.num_workers=14 data.cache_dir=/tmp/dc train.progress=false 2>&1 \
  | grep -v '^wrote ' | tee -a "$OUT/repro.log"
cp "$R"/report.md "$R"/report.json "$R"/loss.png "$R"/throughput.png "$R"/eval.png "$R"/state.json "$OUT"/ 2>/dev/null
ls -la "$R" >> "$OUT/repro.log"
