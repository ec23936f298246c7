"""The grouped expert FFN on one GPU: time against held slots, used experts and rows.

For each expert shape (OLMoE-1B-7B d2048 f1024, Mixtral-8x7B d4096 f14336, DeepSeek-V2-Lite
d2048 f1408), phase (decode: rows = --decode_batch x top-k; prefill: --prefill_rows rows), held
slots ``G`` (the range the placements' slot counts span: 16 / 64 / 96 for the 64-expert models,
2 / 8 / 12 for Mixtral) and used experts (powers of two up to ``G``, and ``G``; the rows split
evenly over groups spread across the slots), every backend of
:func:`moe_edge.kernels.grouped_ffn` is timed on fused bf16 weights. Each row reports the time
and two roofline fractions, both against rates measured in the same run:

  hbm_fraction  = (used experts' weight bytes / HBM read bandwidth) / time
  flop_fraction = (2 x rows x 3 d f / bf16 matmul rate) / time

(HBM read bandwidth: a sum over a 4 GiB bf16 array; matmul rate: an 8192^3 bf16 matmul.)
Timing: one jitted FFN per (shape, phase, G, backend) (group sizes are data, so every ``used``
reuses it), called back to back over several weight sets (so the used weights exceed the L2
many times over), median of --repeats runs of about --target_ms each. With --sweep the goal
points are also timed under several Mosaic block configurations (rows ``mosaic[...]``).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_grouped_ffn.py \\
      --out results/bench_ffn/h200.json --sweep
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moe_edge import kernels
from moe_edge.config import model_config

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["olmoe_1b_7b", "mixtral_8x7b", "deepseek_v2_lite"], "Model configs.")
flags.DEFINE_list("phases", ["decode", "prefill"], "decode and/or prefill.")
flags.DEFINE_list("backends", ["lax", "mosaic"], "grouped_ffn backends to time.")
flags.DEFINE_integer("decode_batch", 8, "Decoding sequences: decode rows = batch x top-k.")
flags.DEFINE_integer("prefill_rows", 4096, "Rows of a prefill step.")
flags.DEFINE_float("target_ms", 25.0, "Wall time of one timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs per point (median).")
flags.DEFINE_bool("sweep", False, "Also time the goal points under several Mosaic configs.")
flags.DEFINE_string("out", "results/bench_ffn/h200.json", "JSON output (the .md beside it).")
flags.DEFINE_string("cache_dir", "/tmp/jax_cache", "Persistent compilation cache folder.")
flags.DEFINE_integer("shrink", 1, "Divide d, f and the prefill rows by this (CPU smoke runs).")

HELD_SLOTS = {64: (16, 64, 96), 8: (2, 8, 12)}  # experts per layer -> G values
L2_BYTES = 60e6
SET_BYTES_CAP = 20e9  # weights of all sets of one G together

# Mosaic block configurations tried with --sweep besides the default policy
# (kernels.mosaic_config): tokamax's own heuristic and neighbours of the policy's choice.
_cfg = kernels.MosaicConfig
SWEEP = {
    "decode": {"bm64_s4": _cfg(block_m=64, num_stages=4),
               "bm64_s4_pM1": _cfg(block_m=64, num_stages=4, persistent=True),
               "bm64_s4_pN4": _cfg(block_m=64, num_stages=4, persistent=True, grid_minor_dim=1,
                                   grid_tile_width=4)},
    "prefill": {"tokamax": kernels.TOKAMAX_HEURISTIC,
                "bm64_s4_pN4": _cfg(block_m=64, num_stages=4, persistent=True, grid_minor_dim=1,
                                    grid_tile_width=4),
                "bm128_s4_N8": _cfg(block_m=128, num_stages=4, grid_minor_dim=1,
                                    grid_tile_width=8)},
}
DECODE_CHAIN = 6  # decode FFNs per jitted call (the host needs ~45 us per call on the H200 VM)


@dataclasses.dataclass(frozen=True)
class Shape:
  model: str
  d: int
  f: int
  top_k: int
  held: tuple[int, ...]

  @property
  def expert_bytes(self) -> int:
    return 3 * self.d * self.f * 2  # bf16


def shapes(names) -> list[Shape]:
  out = []
  for name in names:
    c = model_config(name)
    k = FLAGS.shrink
    out.append(Shape(name, c.d_model // k, c.d_ff_expert // k, c.top_k, HELD_SLOTS[c.n_experts]))
  return out


def used_counts(g: int, rows: int) -> list[int]:
  """Powers of two up to ``min(G, rows)``, and ``G`` itself when every group can get a row."""
  top = min(g, rows)
  used = [1 << i for i in range(int(math.log2(top)) + 1)]
  return sorted(set(used + ([g] if g <= rows else [])))


def group_sizes(g: int, used: int, rows: int) -> np.ndarray:
  """``[G]`` int32: ``rows`` split as evenly as possible over ``used`` groups spread over G."""
  sizes = np.zeros(g, np.int32)
  idx = np.round(np.linspace(0, g - 1, used)).astype(int)
  sizes[idx] = rows // used
  sizes[idx[: rows % used]] += 1
  return sizes


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def timed(fn, arg_sets, repeats: int, target_ms: float, per_call: int = 1) -> float:
  """Median seconds per FFN: ``fn(*args)`` called back to back over ``arg_sets``, each call
  running ``per_call`` FFNs."""
  out = None
  for args in arg_sets:  # compile and warm every set
    out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for args in arg_sets:
    out = fn(*args)
  jax.block_until_ready(out)
  per_pass = time.perf_counter() - t0
  passes = max(1, math.ceil(target_ms * 1e-3 / max(per_pass, 1e-6)))
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(passes):
      for args in arg_sets:
        out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / (passes * len(arg_sets) * per_call))
  return statistics.median(runs)


def measure_peaks(repeats: int, target_ms: float, shrink: int = 1) -> dict:
  """HBM read bandwidth (bytes/s) and bf16 matmul rate (FLOP/s) of the default device."""
  key = jax.random.key(0)
  size = (1 << 31) // shrink ** 2
  big = [jax.random.normal(jax.random.fold_in(key, i), (size,), jnp.bfloat16) for i in range(2)]
  read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  t_read = timed(read, [(a,) for a in big], repeats, target_ms)
  del big
  n = 8192 // shrink
  mats = [tuple(jax.random.normal(jax.random.fold_in(key, 10 + 2 * i + j), (n, n), jnp.bfloat16)
                for j in range(2)) for i in range(2)]
  t_mm = timed(jax.jit(jnp.matmul), mats, repeats, target_ms)
  empty = jax.jit(lambda a: a)
  small = jnp.zeros((8,), jnp.float32)
  t_empty = timed(empty, [(small,)], repeats, target_ms)
  return dict(hbm_read_bytes_per_s=size * 2 / t_read, bf16_matmul_flops=2 * n ** 3 / t_mm,
              host_dispatch_s=t_empty)


def weight_sets(shape: Shape, g: int, key) -> list[tuple[jax.Array, jax.Array]]:
  """Enough fused bf16 weight sets ``(w_gate_up [G,d,2f], w_down [G,f,d])`` that one used expert
  per set, over all sets, is several L2s; at most SET_BYTES_CAP bytes together."""
  n = min(12, max(1, math.ceil(3 * L2_BYTES / shape.expert_bytes)),
          max(1, int(SET_BYTES_CAP // (g * shape.expert_bytes))))
  d, f = shape.d, shape.f
  out = []
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    out.append((jax.random.normal(k1, (g, d, 2 * f), jnp.bfloat16) * d ** -0.5,
                jax.random.normal(k2, (g, f, d), jnp.bfloat16) * f ** -0.5))
  return out


def ffn_fn(backend: str, config, chain: int):
  """The jitted timed program: ``chain`` grouped FFNs in sequence, each on the previous one's
  output (x2, fused into the FFN's last elementwise pass) with its own weight set:
  ``fn(x, group_sizes, wgu_0, wd_0, ..., wgu_{chain-1}, wd_{chain-1})``."""
  name = "mosaic" if backend.startswith("mosaic") else backend

  def program(x, gs, *ws):
    for i in range(chain):
      x = kernels.grouped_ffn(x, gs, ws[2 * i], ws[2 * i + 1], backend=name, config=config) * 2
    return x

  return jax.jit(program)


def call_args(xs, gs, sets, chain: int) -> list[tuple]:
  """Argument tuples for :func:`ffn_fn` rotating over every weight set (cycled to ``chain``)."""
  n = max(len(sets), chain)
  cyc = [sets[i % len(sets)] for i in range(math.ceil(n / chain) * chain)]
  return [(xs[j % len(xs)], gs) + tuple(a for w in cyc[j * chain:(j + 1) * chain] for a in w)
          for j in range(len(cyc) // chain)]


def _row(shape, phase, rows, g, used, backend, seconds, peaks, config, chain) -> dict:
  flops = 2 * rows * 3 * shape.d * shape.f
  t_hbm = used * shape.expert_bytes / peaks["hbm_read_bytes_per_s"]
  t_flop = flops / peaks["bf16_matmul_flops"]
  return dict(model=shape.model, phase=phase, rows=rows, held_slots=g, used=used,
              backend=backend, ms=1e3 * seconds, hbm_fraction=t_hbm / seconds,
              flop_fraction=t_flop / seconds, roofline_fraction=max(t_hbm, t_flop) / seconds,
              d=shape.d, f=shape.f, chain=chain,
              config=config if not isinstance(config, kernels.MosaicConfig) else
              dataclasses.asdict(config))


def sweep_points(shape: Shape, phase: str, g: int, rows: int) -> list[int]:
  """The ``used`` values swept at this (shape, phase, G): the goals' points."""
  if shape.model == "olmoe_1b_7b" and phase == "decode":
    return [u for u in (1, 8, 16, 32) if u <= g]
  if phase == "prefill" and shape.model == "olmoe_1b_7b":
    return {16: [16], 64: [64], 96: [16, 96]}[g]
  if phase == "prefill" and shape.model == "mixtral_8x7b" and g == 8:
    return [g]
  return []


def run_point_set(shape, phase, rows, g, sets, peaks, log) -> list[dict]:
  """Every backend (and the sweep configs at goal points) at one (shape, phase, G)."""
  key = jax.random.key(rows + g)
  xs = [jax.random.normal(jax.random.fold_in(key, i), (rows, shape.d), jnp.bfloat16)
        for i in range(2)]
  chain = DECODE_CHAIN if phase == "decode" else 1
  variants = [(b, None) for b in FLAGS.backends]
  goal_used = sweep_points(shape, phase, g, rows) if FLAGS.sweep else []
  if goal_used:
    variants += [(f"mosaic[{name}]", cfg) for name, cfg in SWEEP[phase].items()]
  rows_out = []
  for backend, config in variants:
    fn = ffn_fn(backend, config, chain)
    todo = used_counts(g, rows) if config is None else goal_used
    for used in todo:
      gs = jnp.asarray(group_sizes(g, used, rows))
      try:
        sec = timed(fn, call_args(xs, gs, sets, chain), FLAGS.repeats, FLAGS.target_ms, chain)
      except Exception as e:  # a config a kernel rejects is reported, not fatal
        log(f"  {backend} used={used}: FAILED {type(e).__name__}: {str(e)[:200]}")
        break
      if config is None and backend == "mosaic":
        config_used = kernels.mosaic_config(rows, g) or kernels.TOKAMAX_HEURISTIC
      else:
        config_used = config
      r = _row(shape, phase, rows, g, used, backend, sec, peaks, config_used, chain)
      rows_out.append(r)
      log(f"  {shape.model:17s} {phase:7s} rows={rows:5d} G={g:3d} used={used:3d} "
          f"{backend:26s} {r['ms']:8.3f} ms  hbm {r['hbm_fraction']:.2f} "
          f"flop {r['flop_fraction']:.2f}")
  return rows_out


# --------------------------------------------------------------------------------------------
# Goals and the table
# --------------------------------------------------------------------------------------------
def best(rows, **match) -> dict | None:
  """The fastest Mosaic row (default or any swept config) matching ``match``."""
  cands = [r for r in rows if r["backend"].startswith("mosaic")
           and all(r[k] == v for k, v in match.items())]
  return min(cands, key=lambda r: r["ms"]) if cands else None


def goals(rows) -> dict:
  """The issue's three goals, from the default ("mosaic") rows and from the best config."""
  out = dict(g96_over_g16=[], decode_hbm=[], prefill_flop=[])
  for r16 in [r for r in rows if r["backend"] == "mosaic" and r["held_slots"] == 16]:
    r96 = [r for r in rows if r["backend"] == "mosaic" and r["held_slots"] == 96 and
           all(r[k] == r16[k] for k in ("model", "phase", "rows", "used"))]
    if r96:
      out["g96_over_g16"].append(dict(model=r16["model"], phase=r16["phase"], used=r16["used"],
                                      ratio=r96[0]["ms"] / r16["ms"]))
  for used in (8, 16, 32):
    d = [r for r in rows if r["backend"] == "mosaic" and r["model"] == "olmoe_1b_7b" and
         r["phase"] == "decode" and r["held_slots"] == 64 and r["used"] == used]
    b = best(rows, model="olmoe_1b_7b", phase="decode", held_slots=64, used=used)
    if d:
      out["decode_hbm"].append(dict(used=used, rows=d[0]["rows"], default=d[0]["hbm_fraction"],
                                    best=b["hbm_fraction"], best_backend=b["backend"]))
  for model, g in (("olmoe_1b_7b", 16), ("olmoe_1b_7b", 64), ("mixtral_8x7b", 8)):
    d = [r for r in rows if r["backend"] == "mosaic" and r["model"] == model and
         r["phase"] == "prefill" and r["held_slots"] == g and r["used"] == g]
    b = best(rows, model=model, phase="prefill", held_slots=g, used=g)
    if d:
      out["prefill_flop"].append(dict(model=model, held_slots=g, default=d[0]["flop_fraction"],
                                      best=b["flop_fraction"], best_backend=b["backend"],
                                      roofline_best=b["roofline_fraction"]))
  return out


def markdown(result: dict) -> str:
  p = result["peaks"]
  lines = [f"# Grouped expert FFN on {result['device']}", "",
           f"jax {result['jax']}, tokamax {result['tokamax']}; measured HBM read "
           f"{p['hbm_read_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
           f"{p['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s. Fractions: of the HBM roofline of "
           f"the used experts' weights (hbm) and of the matmul rate (flop).", "",
           "| model | phase | rows | G | used | backend | ms | hbm | flop |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    lines.append(f"| {r['model']} | {r['phase']} | {r['rows']} | {r['held_slots']} | "
                 f"{r['used']} | {r['backend']} | {r['ms']:.3f} | {r['hbm_fraction']:.2f} | "
                 f"{r['flop_fraction']:.2f} |")
  g = result["goals"]
  lines += ["", "## Goals", "", "G=96 over G=16 (mosaic, equal rows and used): " +
            ", ".join(f"{x['model']} {x['phase']} u{x['used']} {x['ratio']:.2f}"
                      for x in g["g96_over_g16"]), "",
            "Decode, OLMoE, 64 rows, G=64, HBM fraction (default / best config): " +
            ", ".join(f"used {x['used']}: {x['default']:.2f} / {x['best']:.2f} "
                      f"({x['best_backend']})" for x in g["decode_hbm"]), "",
            "Prefill, 4096 rows, used = G, matmul fraction (default / best; best's roofline "
            "fraction): " + ", ".join(f"{x['model']} G={x['held_slots']}: {x['default']:.2f} / "
                                      f"{x['best']:.2f} ({x['best_backend']}; "
                                      f"{x['roofline_best']:.2f})" for x in g["prefill_flop"])]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  t_start = time.time()
  jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  log = lambda s: print(s, flush=True)  # noqa: E731
  dev = jax.devices()[0]
  peaks = measure_peaks(FLAGS.repeats, FLAGS.target_ms, FLAGS.shrink)
  log(f"{dev.device_kind}: HBM read {peaks['hbm_read_bytes_per_s'] / 1e12:.2f} TB/s, bf16 "
      f"matmul {peaks['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, host dispatch "
      f"{peaks['host_dispatch_s'] * 1e6:.1f} us")
  rows = []

  def write() -> dict:  # after every (shape, G): a run cut short still leaves its rows
    result = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  tokamax=kernels.tokamax_version(), date=time.strftime("%Y-%m-%d"),
                  peaks=peaks, seconds=time.time() - t_start,
                  flags={k: FLAGS[k].value for k in ("models", "phases", "backends",
                                                      "decode_batch", "prefill_rows",
                                                      "target_ms", "repeats", "sweep")},
                  rows=rows, goals=goals(rows))
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return result

  for shape in shapes(FLAGS.models):
    for g in shape.held:
      sets = weight_sets(shape, g, jax.random.key(g))
      for phase in FLAGS.phases:
        n = (FLAGS.decode_batch * shape.top_k if phase == "decode" else
             FLAGS.prefill_rows // FLAGS.shrink)
        rows += run_point_set(shape, phase, n, g, sets, peaks, log)
      del sets
      gc.collect()
      write()
  result = write()
  log(markdown(result).split("## Goals")[1])
  log(f"wrote {FLAGS.out} and its .md in {result['seconds']:.0f} s")

if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  app.run(main)
