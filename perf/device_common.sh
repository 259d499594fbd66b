# Sourced by perf/device_check.sh and perf/device_check_dali.sh, which call parse_args "$@" and then
# set OUT and PY before prepare and step.
# step NAME LIMIT CMD...: run CMD under `timeout LIMIT`, output in $OUT/NAME.log, its last lines on
# the console, the command, exit status and seconds in $OUT/check.log; with --dry-run only listed.

# Tiny shapes of the CPU rehearsal (resnet18, 32 px, batch 4): seconds per step.
TINY_CPU=(model.arch=resnet18 model.hid_dim=32 model.out_dim=16 model.queue_len=32 data.image_size=32
          optim.batch_size=4 model.bn_group_size=2)
FAILED=0

# parse_args "$@": --device cuda|cpu (default cuda) and --dry-run, into DEVICE, DRY and LIMIT_SCALE.
parse_args() {
  DEVICE=cuda
  DRY=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
      --device=*) DEVICE=${1#--device=}; shift ;;
      --dry-run) DRY=1; shift ;;
      *) echo "error: unknown option $1 (use --device cuda|cpu, --dry-run)" >&2; exit 2 ;;
    esac
  done
  case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device $DEVICE: use cuda or cpu" >&2; exit 2 ;; esac
  # The limits are set for the GPU; a CPU rehearsal (tiny shapes, but inductor's C++ compile on a
  # possibly shared CPU) gets LIMIT_SCALE times as long (default 4 on the CPU).
  if [ "$DEVICE" = cpu ]; then LIMIT_SCALE=${LIMIT_SCALE:-4}; else LIMIT_SCALE=${LIMIT_SCALE:-1}; fi
}

step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  echo "== $name (timeout ${limit} s): $*" | tee -a "$OUT/check.log"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/check.log"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

prepare() {
  mkdir -p "$OUT"
  : > "$OUT/check.log"
  echo "device check ($DEVICE$([ "$DRY" = 1 ] && echo ', dry run')), out $OUT" | tee -a "$OUT/check.log"
  [ "$DRY" = 1 ] && return 0
  if ls .whl/*.whl >/dev/null 2>&1; then   # omegaconf for the device's Python (see the header)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  { [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } > "$OUT/env.log" 2>&1
  cat "$OUT/env.log"
}

finish() {
  echo "device check done: $FAILED step(s) failed; files in $OUT" | tee -a "$OUT/check.log"
  [ "$DRY" = 1 ] || ls -la "$OUT" >> "$OUT/check.log"
  return 0
}
