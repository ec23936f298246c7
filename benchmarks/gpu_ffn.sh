#!/usr/bin/env bash
# The grouped-FFN GPU run: one command on one H200 (issue 15), from the repository root.
#
#   OUT=/path/to/results WHL=/path/to/wheels bash benchmarks/gpu_ffn.sh
#
# 1. installs tokamax 0.0.17 and its missing import-time dependencies from $WHL (pip --no-index
#    --no-deps --target /tmp/site; the GPU machine has no internet) and puts
#    benchmarks/xprof_stub on PYTHONPATH (see its README: tokamax imports one xprof name);
# 2. test_gpu.txt: tests/kernels/test_grouped_ffn_gpu.py (Mosaic vs lax vs a float64 reference,
#    and the trained small_moe's bf16 forward on the GPU against the CPU);
# 3. h200.json, h200.md, bench.log: benchmarks/bench_grouped_ffn.py $BENCH_FLAGS (default
#    --sweep), cut at $BENCH_S seconds (default 420; the JSON is rewritten after every shape).
set -u
OUT=${OUT:?set OUT to the folder for the results}
WHL=${WHL:?set WHL to the folder of wheels}
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks/xprof_stub
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv \
  > "$OUT/smi.txt" 2>&1
t0=$(date +%s)
JAX_PLATFORMS=cuda,cpu timeout 180 $PY -m pytest -q -s -p no:cacheprovider \
  tests/kernels/test_grouped_ffn_gpu.py > "$OUT/test_gpu.txt" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/test_gpu.txt"
t0=$(date +%s)
timeout "${BENCH_S:-420}" $PY benchmarks/bench_grouped_ffn.py --out "$OUT/h200.json" \
  ${BENCH_FLAGS:---sweep} > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - t0 )) s"; tail -12 "$OUT/bench.log"
