# Sourced by perf/device_check.sh and perf/device_check_dali.sh, which call parse_args "$@" and then
# set OUT and PY before prepare and step.
# step NAME LIMIT CMD...: run CMD under `timeout -k KILL_GRACE LIMIT` (TERM at LIMIT, KILL
# KILL_GRACE s later: a process that ignores TERM cannot hang the device call), its output
# appended to $OUT/log.txt (one file for every step: a device call returns at most 8 files) and its
# last lines on the console; the command, exit status and seconds go to $OUT/check.log. With
# --dry-run the steps are only listed, on stdout: nothing is written anywhere. With --only
# NAME[,NAME] only those steps run (a rerun of what failed, within the same session's budget).

# Tiny shapes of the CPU rehearsal (resnet18, 32 px, batch 4): seconds per step.
TINY_CPU=(model.arch=resnet18 model.hid_dim=32 model.out_dim=16 model.queue_len=32 data.image_size=32
          optim.batch_size=4 model.bn_group_size=2)
FAILED=0
KILL_GRACE=${KILL_GRACE:-5}
SITE=/tmp/site WORK=/tmp/w PIP_TAGS=   # the device's; prepare gives the CPU rehearsal private ones
LIMITS_SUM=0

# parse_args "$@": --device cuda|cpu (default cuda), --dry-run, --only NAMES, into DEVICE, DRY, ONLY and LIMIT_SCALE.
parse_args() {
  DEVICE=cuda
  DRY=0
  ONLY=
  while [ $# -gt 0 ]; do
    case "$1" in
      --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
      --device=*) DEVICE=${1#--device=}; shift ;;
      --dry-run) DRY=1; shift ;;
      --only) ONLY=${2:?--only needs step names}; shift 2 ;;
      --only=*) ONLY=${1#--only=}; shift ;;
      *) echo "error: unknown option $1 (use --device cuda|cpu, --dry-run, --only STEP[,STEP])" >&2; exit 2 ;;
    esac
  done
  case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device $DEVICE: use cuda or cpu" >&2; exit 2 ;; esac
  # The limits are set for the GPU; a CPU rehearsal (tiny shapes, but inductor's C++ compile on a
  # possibly shared CPU) gets LIMIT_SCALE times as long (default 4 on the CPU).
  if [ "$DEVICE" = cpu ]; then LIMIT_SCALE=${LIMIT_SCALE:-4}; else LIMIT_SCALE=${LIMIT_SCALE:-1}; fi
}

# check_only STEP...: the names the script has; an --only naming another is a usage error.
check_only() {
  local want
  for want in ${ONLY//,/ }; do
    case " $* " in *" $want "*) ;; *) echo "error: --only $want: no such step (steps: $*)" >&2; exit 2 ;; esac
  done
}

# say TEXT: to the console and, unless a dry run, to $OUT/check.log.
say() {
  if [ "$DRY" = 1 ]; then echo "$*"; else echo "$*" | tee -a "$OUT/check.log"; fi
}

step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    return 0
  fi
  LIMITS_SUM=$((LIMITS_SUM + limit))
  say "== $name (timeout ${limit} s, kill ${KILL_GRACE} s later): $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc from cmd=("$@")
  if [ "$(type -t "$1")" = function ]; then   # timeout runs programs: a function goes through bash -c
    cmd=(bash -c "$(declare -f); \"\$@\"" _ "$@")
  fi
  echo "===== $name: $*" >> "$OUT/log.txt"
  from=$(($(wc -l < "$OUT/log.txt") + 1))
  timeout -k "$KILL_GRACE" "$limit" "${cmd[@]}" >> "$OUT/log.txt" 2>&1
  rc=$?
  tail -n +"$from" "$OUT/log.txt" | tail -n 40
  say "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (time limit)')"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

# install_parts DIR...: the partNN files of one wheel tar (../shared/tools/device_wheels.py) found
# in DIR... (their pN subfolders included), joined in part order, unpacked and installed into
# $SITE (/tmp/site on the device), which use_site puts on PYTHONPATH. A missing set is said and
# skipped; an incomplete one fails the step. The CPU rehearsal installs the device's wheels (Python
# 3.12) into a temporary folder that no Python here uses, for the device's tags (PIP_TAGS).
install_parts() {
  local parts
  parts=$(find "$@" -maxdepth 2 -type f -name 'part[0-9]*' 2>/dev/null | awk -F/ '!seen[$NF]++ {print $NF "\t" $0}' \
          | sort | cut -f2-)
  if [ -z "$parts" ]; then
    echo "no wheel parts in $*"
    return 0
  fi
  rm -rf "$WORK" && mkdir -p "$WORK"
  # shellcheck disable=SC2086
  if ! cat $parts | tar x -C "$WORK"; then
    echo "error: the wheel parts in $* do not form a whole tar (a part missing?):" $parts
    return 1
  fi
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile $PIP_TAGS --target "$SITE" "$WORK"/*.whl || return 1
  echo "installed into $SITE:" $(cd "$WORK" && ls)
}

# Runs in the script's own shell (not a step): PYTHONPATH must reach the steps after it.
use_site() {
  [ "$DEVICE" = cuda ] && [ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  return 0
}

prepare() {
  if [ "$DRY" = 1 ]; then
    echo "device check ($DEVICE, dry run: nothing is written), out $OUT"
    return 0
  fi
  mkdir -p "$OUT"
  : > "$OUT/check.log"
  : > "$OUT/log.txt"
  say "device check ($DEVICE), out $OUT"
  if [ "$DEVICE" = cpu ]; then   # private folders: the CPU machine is shared
    SITE=$(mktemp -d /tmp/device-check-site.XXXXXX) WORK=$(mktemp -d /tmp/device-check-wheels.XXXXXX)
    PIP_TAGS="--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64"
    trap 'rm -rf "$SITE" "$WORK"' EXIT
  fi
  export PYTHONUNBUFFERED=1 PY DEVICE SITE WORK PIP_TAGS
}

env_report() {
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  "$PY" -c "import omegaconf; print('omegaconf', omegaconf.__version__)" || echo "omegaconf missing: carry .device-wheels/omegaconf (see the header)"
  git rev-parse HEAD 2>/dev/null
  git status --short 2>/dev/null | head -20
  return 0
}

finish() {
  say "device check done: $FAILED step(s) failed; step limits sum to ${LIMITS_SUM} s (+${KILL_GRACE} s kill grace per step); files in $OUT"
  [ "$DRY" = 1 ] || ls -laR "$OUT" >> "$OUT/check.log"
  return 0
}
