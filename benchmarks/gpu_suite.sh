#!/usr/bin/env bash
# The GPU suite: one command on a machine with 4 GPUs of one host (written for 4 x H200).
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh        # from the repository root
#
# Runs, each under its own time limit and all within 6 minutes, writing 8 files to $OUT:
#   1. test_gpu.txt         tests/parallel/test_dispatch.py -k gpu: ragged vs padded transport
#                           (and vs a numpy reference) on the GPUs
#   2. serve.txt, debug.txt benchmarks/gpu_debug.sh, its five serve.py variants at once (each in
#                           its own process with -X faulthandler): serve.txt is the full-size
#                           run (the trained small_moe on 2 GPU servers, ragged transport, a live
#                           migration, checked against one device); debug.txt the verdict of
#                           every variant (2 / 4 servers, padded / ragged, with / without
#                           migration) and the tail of each small run's output
#   3. bench_dispatch.md/.json, bench.log
#                           experiments/bench_dispatch.py: OLMoE-1B-7B and Mixtral-8x7B single-
#                           layer dispatch, decode and prefill, dancemoe / uniform_ep / maxtext,
#                           padded and ragged, with the roofline and the grouped-matmul rows
#   4. bench_fusion.log     the prefill rows again with XLA's cuDNN ragged-dot fusion
#                           (--xla_gpu_experimental_use_ragged_dot_fusion=true) when this XLA has
#                           the flag (by default XLA:GPU expands ragged_dot into a dense dot over
#                           every group); skipped, with a line in suite.log, otherwise
#   suite.log               what ran, exit codes and seconds of each step
#
# Environment: PYTHON (default python3), MOE_EDGE_DATA (default .carry/model_data: corpus/ and
# routing_stats/ of ../shared/data). The package need not be installed (PYTHONPATH=$PWD).
set -u
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MOE_EDGE_DATA=${MOE_EDGE_DATA:-$PWD/.carry/model_data}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts
unset XLA_FLAGS JAX_PLATFORMS
DEADLINE=$((SECONDS + 350))
FUSION=--xla_gpu_experimental_use_ragged_dot_fusion=true

log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/suite.log"; }

step() {  # step NAME LIMIT_SECONDS OUTPUT_FILE COMMAND...  (limit clamped to the deadline)
  local name=$1 limit=$2 file=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then log "skip $name: only ${left}s left of the suite"; return; fi
  local t0=$SECONDS
  log "start $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$file" 2>&1
  local rc=$?
  log "end $name: exit $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
}

log "GPU suite on $(hostname); data $MOE_EDGE_DATA"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/suite.log"
[ -d "$MOE_EDGE_DATA/corpus" ] || log "WARNING: no corpus under $MOE_EDGE_DATA (serve.py needs it)"
[ -d "$MOE_EDGE_DATA/routing_stats" ] || log "WARNING: no routing_stats under $MOE_EDGE_DATA (bench needs it)"

step test_gpu 50 test_gpu.txt \
  env JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/parallel/test_dispatch.py -k gpu -rs

# gpu_debug.sh writes debug.txt and serve.txt itself; its stdout (the verdicts) goes to suite.log.
step serve_and_debug 130 .debug_stdout \
  env OUT="$OUT" PYTHON="$PY" DEBUG_ONE_FILE=1 DEBUG_ONE_WAVE=1 SERVE_FULL=1 DEBUG_LIMIT=110 \
  bash benchmarks/gpu_debug.sh
cat "$OUT/.debug_stdout" >> "$OUT/suite.log" && rm -f "$OUT/.debug_stdout"

step bench 150 bench.log \
  "$PY" experiments/bench_dispatch.py --out "$OUT" --decode_tokens 128 --prefill_tokens 4096 \
  --repeats 20 --prefill_repeats 10 --warmup 3

if XLA_FLAGS=$FUSION "$PY" -c "import jax; jax.devices()" > /dev/null 2>&1; then
  step bench_fusion 80 bench_fusion.log \
    env XLA_FLAGS=$FUSION "$PY" experiments/bench_dispatch.py --out /tmp/bench_fusion \
    --phases prefill --transports padded,ragged --prefill_tokens 4096 --prefill_repeats 10 \
    --warmup 3 --noslicing_check
else
  log "skip bench_fusion: this XLA does not know $FUSION"
fi

log "done in $((SECONDS))s; files: $(ls "$OUT" | tr '\n' ' ')"
