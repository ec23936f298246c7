#!/usr/bin/env bash
# Which serving configurations run on the GPUs: one call, each variant in its own process.
#
#   OUT=/path/to/results bash benchmarks/gpu_debug.sh       # from the repository root, >= 4 GPUs
#
# Runs experiments/serve.py (trained small_moe, cluster homogeneous_4, --copies 1.25, small
# batches) under `python3 -X faulthandler` (a segfault prints the Python stack) and `timeout`,
# in two waves of concurrent processes (XLA_PYTHON_CLIENT_PREALLOCATE=false, so they share the
# GPUs; DEBUG_SERIAL=1 runs them one by one instead):
#
#   wave 1: s2_ragged_migrate   2 servers (a mesh over 2 of the GPUs), ragged, migrate to uniform_ep
#           s2_padded_migrate   2 servers, padded, migrate
#           s2_ragged_static    2 servers, ragged, no migration
#   wave 2: s4_padded_migrate   4 servers, padded, migrate
#           s4_ragged_migrate   4 servers, ragged, migrate
#
# Writes to $OUT (7 files at most): debug.txt (verdict per variant: PASS, FAIL (exit 1: wrong
# numbers), SEGFAULT (139), TIMEOUT (124), or another exit code, with seconds), debug_<variant>.txt
# (each variant's output), and copy_hlo_dump.tgz (the XLA passes over the migration copy
# program of s2_ragged_migrate, kept only if that variant did not pass: the last pass dumped
# is the one the compiler was in). About 2 to 3.5 minutes.
#
# Environment: PYTHON (default python3), MOE_EDGE_DATA (default .carry/model_data),
# DEBUG_LIMIT (seconds per variant, default 100), DEBUG_SERIAL=1, DEBUG_ONE_FILE=1 (all variant
# output appended to debug.txt instead of one file each, and no dump: for gpu_suite.sh),
# SERVE_FULL=1 (s2_ragged_migrate at the suite's full size, its output to serve.txt),
# DEBUG_ONE_WAVE=1 (all five at once; their timings then mean nothing).
set -u
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MOE_EDGE_DATA=${MOE_EDGE_DATA:-$PWD/.carry/model_data}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset JAX_PLATFORMS
LIMIT=${DEBUG_LIMIT:-100}
ONE_FILE=${DEBUG_ONE_FILE:-0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

SMALL="--requests_per_server 2 --prompt_len 16 --max_new_tokens 6"
FULL="--requests_per_server 8 --prompt_len 64 --max_new_tokens 16"
COMMON="--cluster homogeneous_4 --copies 1.25"
MIGRATE="--migrate_to uniform_ep"
declare -A ARGS=(
  [s2_ragged_migrate]="--num_servers 2 --transport ragged $MIGRATE"
  [s2_padded_migrate]="--num_servers 2 --transport padded $MIGRATE"
  [s2_ragged_static]="--num_servers 2 --transport ragged"
  [s4_padded_migrate]="--num_servers 4 --transport padded $MIGRATE"
  [s4_ragged_migrate]="--num_servers 4 --transport ragged $MIGRATE"
)
WAVES=("s2_ragged_migrate s2_padded_migrate s2_ragged_static" "s4_padded_migrate s4_ragged_migrate")
if [ "${DEBUG_ONE_WAVE:-0}" = 1 ]; then WAVES=("${WAVES[0]} ${WAVES[1]}"); fi

log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/debug.txt"; }

logfile() {  # where variant $1 writes
  if [ "$1" = s2_ragged_migrate ] && [ "${SERVE_FULL:-0}" = 1 ]; then echo "$OUT/serve.txt"
  elif [ "$ONE_FILE" = 1 ]; then echo "$TMP/$1.txt"
  else echo "$OUT/debug_$1.txt"; fi
}

launch() {  # launch VARIANT: start it in the background, its pid in $TMP/VARIANT.pid
  local name=$1 size=$SMALL flags=""
  [ "$name" = s2_ragged_migrate ] && [ "${SERVE_FULL:-0}" = 1 ] && size=$FULL
  if [ "$name" = s2_ragged_migrate ] && [ "$ONE_FILE" != 1 ]; then
    flags="--xla_dump_to=$TMP/dump --xla_dump_hlo_module_re=.*migration_copy.* --xla_dump_hlo_pass_re=.*"
  fi
  echo "\$ XLA_FLAGS='$flags' $PY -X faulthandler experiments/serve.py $COMMON ${ARGS[$name]} $size" \
    > "$(logfile "$name")"
  (
    t0=$SECONDS
    XLA_FLAGS="$flags" timeout --signal=TERM --kill-after=10 "$LIMIT" \
      "$PY" -X faulthandler experiments/serve.py $COMMON ${ARGS[$name]} $size \
      >> "$(logfile "$name")" 2>&1
    echo "$? $((SECONDS - t0))" > "$TMP/$name.rc"
  ) &
  echo $! > "$TMP/$name.pid"
}

verdict() {  # verdict RC
  case $1 in
    0) echo PASS ;; 1) echo "FAIL (exit 1: wrong numbers or a usage error, see the log)" ;;
    124|137) echo "TIMEOUT (over ${LIMIT}s)" ;; 134) echo "ABORT (exit 134)" ;;
    139) echo "SEGFAULT (exit 139)" ;; *) echo "exit $1" ;;
  esac
}

log "gpu_debug on $(hostname): $("$PY" -c 'import jax; print("jax", jax.__version__, jax.device_count(), "x", jax.devices()[0].device_kind)' 2>&1 | tail -1)"
for wave in "${WAVES[@]}"; do
  for name in $wave; do
    launch "$name"
    [ "${DEBUG_SERIAL:-0}" = 1 ] && wait "$(cat "$TMP/$name.pid")"
  done
  for name in $wave; do wait "$(cat "$TMP/$name.pid")"; done
  for name in $wave; do
    read -r rc secs < "$TMP/$name.rc"
    log "$name: $(verdict "$rc") after ${secs}s  [${ARGS[$name]}]"
    echo "$rc" > "$TMP/$name.final"
  done
done

if [ "$ONE_FILE" = 1 ]; then
  for wave in "${WAVES[@]}"; do
    for name in $wave; do
      [ -f "$TMP/$name.txt" ] || continue
      { echo; echo "===== $name ====="; grep -v '^I[0-9]\{4\} ' "$TMP/$name.txt" | tail -n 80; } \
        >> "$OUT/debug.txt"
    done
  done
elif [ "$(cat "$TMP/s2_ragged_migrate.final")" != 0 ] && [ -d "$TMP/dump" ]; then
  tar -C "$TMP" -czf "$OUT/copy_hlo_dump.tgz" dump
  log "s2_ragged_migrate failed: XLA passes over the copy program in copy_hlo_dump.tgz (last: $(ls -t "$TMP/dump" | head -1))"
fi
passed=$(for n in "${!ARGS[@]}"; do [ "$(cat "$TMP/$n.final")" = 0 ] && echo "$n"; done | sort | tr '\n' ' ')
log "passed: ${passed:-none}"
