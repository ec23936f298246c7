#!/usr/bin/env bash
# The GPU suite: one command on a machine with >= 2 GPUs of one host (written for 2 x H200).
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh        # from the repository root
#
# Runs, each under its own time limit (6 minutes in all at most), writing to $OUT:
#   1. test_gpu.txt         tests/parallel/test_dispatch.py -k gpu: ragged vs padded transport
#                           (and vs a numpy reference) on the GPUs
#   2. serve.txt            experiments/serve.py: the trained small_moe on 2 GPU servers with the
#                           ragged transport and a live migration, checked against one device
#   3. bench_dispatch.md/.json, bench.log
#                           experiments/bench_dispatch.py: OLMoE-1B-7B and Mixtral-8x7B single-
#                           layer dispatch, decode and prefill, dancemoe / uniform_ep / maxtext,
#                           padded and ragged, with the roofline
#   4. calibration.json, calibration.txt
#                           python -m moe_edge.cost.calibrate: kernel calibration of GPU 0
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

log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/suite.log"; }

step() {  # step NAME LIMIT_SECONDS OUTPUT_FILE COMMAND...
  local name=$1 limit=$2 file=$3
  shift 3
  local t0=$SECONDS
  log "start $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$file" 2>&1
  local rc=$?
  log "end $name: exit $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
}

log "GPU suite on $(hostname); data $MOE_EDGE_DATA"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/suite.log"
[ -d "$MOE_EDGE_DATA/corpus" ] || log "WARNING: no corpus under $MOE_EDGE_DATA (serve.py needs it)"
[ -d "$MOE_EDGE_DATA/routing_stats" ] || log "WARNING: no routing_stats under $MOE_EDGE_DATA (bench needs it)"

step test_gpu 60 test_gpu.txt \
  env JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/parallel/test_dispatch.py -k gpu -rs

step serve 75 serve.txt \
  "$PY" experiments/serve.py --cluster homogeneous_4 --num_servers 2 --transport ragged \
  --requests_per_server 8 --prompt_len 64 --max_new_tokens 16 --migrate_to uniform_ep \
  --copies 1.25

step bench 170 bench.log \
  "$PY" experiments/bench_dispatch.py --out "$OUT" --decode_tokens 128 --prefill_tokens 4096 \
  --repeats 20 --prefill_repeats 10 --warmup 3

step calibrate 45 calibration.txt \
  "$PY" -m moe_edge.cost.calibrate --out "$OUT/calibration.json" --repeats 10

log "done; files: $(ls "$OUT" | tr '\n' ' ')"
