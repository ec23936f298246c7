r"""Benchmark one MoE layer's dispatch on N devices: placement-driven path vs a MaxText-style
expert-parallel baseline, at the real shapes of OLMoE-1B-7B and Mixtral-8x7B.

Setup (one process, ``N`` = ``--num_devices`` devices of one host, one device per server):

* Shapes: one MoE layer of ``--models`` (OLMoE-1B-7B: d 2048, f 1024, E 64, k 8; Mixtral-8x7B:
  d 4096, f 14336, E 8, k 2), ``--dtype`` weights and activations (default bfloat16). Decode
  (``--decode_tokens`` per device) and prefill (``--prefill_tokens`` per device).
* Routing: a statistics-driven trace (:func:`moe_edge.workload.stats_traces.sample_stats_trace`,
  the real per-domain routing counts, locality ``--alpha``, device ``i`` mostly serving domain
  ``DOMAINS[i % 5]``), layer ``--layer``. The DanceMoE placement is planned on a separate
  profiling trace of the same distribution (other seed).
* Configurations, each for both transports (``padded``: ``all_to_all`` of fixed buffers sized
  to the worst case ``T * k`` rows per pair, no capacity factor; ``ragged``:
  ``ragged_all_to_all`` of exactly the rows, GPU/TPU only):

  - ``dancemoe``: our dispatch (:func:`moe_edge.parallel.dispatch.layer_program`) with a DanceMoE
    placement of ``--copies`` x E/N expert slots per device (replicas of hot experts allowed);
  - ``dancemoe_refined``: the same with the latency-refined DanceMoE placement (not by default);
  - ``uniform_ep``: our dispatch with vanilla expert parallelism (E/N experts per device);
  - ``maxtext``: written here, MaxText style: uniform EP in contiguous blocks, sort the
    token-choices by expert, exchange per-destination buffers (``all_to_all`` sized to the max,
    or ``ragged_all_to_all``), sort received rows by local expert, ``ragged_dot``, send back,
    unpermute, weighted sum. Every choice goes through the exchange (own device included).

Reported per row: median step time over ``--repeats`` calls after ``--warmup`` (each call
``block_until_ready``), remote rows (token-choices crossing devices), real bytes (rows x d x
itemsize, dispatch + combine) and wire bytes (what the collectives carry across devices,
padding included), and the fraction of the roofline. Rates are measured in the same process:
``all_to_all`` bandwidth (bytes each device sends to others per second), a large matmul's
FLOP/s and an elementwise pass's HBM bytes/s. Roofline time =
``max(comm_bytes / a2a_bw, expert_flops / matmul_rate, weight_bytes / hbm_bw)`` of the busiest
device, with real (unpadded) bytes and the weights of the experts that device really uses
(the third term is added to the two of a plain compute/communication roofline because decode
is weight-read bound); fraction = roofline / measured. Outputs of all configurations are
compared with each other (they compute the same function). A small extra check compiles a
two-layer model loop with stacked ``[N, L, S, ...]`` slot weights sliced per layer vs per-layer
arrays and reports the compiled temporary memory and time of both.

The Markdown table and a JSON go to ``--out``::

  python experiments/bench_dispatch.py --out results/bench              # on >= 2 GPUs
  python experiments/bench_dispatch.py --small --num_devices 2 --out /tmp/b   # CPU smoke test
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moe_edge.io import atomic, check_output_file, cli

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["olmoe_1b_7b", "mixtral_8x7b"], "Model shapes (and their routing "
                  "statistics).")
flags.DEFINE_list("phases", ["decode", "prefill"], "decode and/or prefill.")
flags.DEFINE_integer("decode_tokens", 128, "Tokens per device in a decode step.")
flags.DEFINE_integer("prefill_tokens", 4096, "Tokens per device in a prefill step.")
flags.DEFINE_list("methods", ["dancemoe", "uniform_ep", "maxtext"], "Configurations.")
flags.DEFINE_list("transports", None, "padded and/or ragged (default: both on GPU/TPU, padded "
                  "on CPU).")
flags.DEFINE_integer("num_devices", None, "Devices = servers (default: all; on CPU with --small "
                     "the script creates this many host devices, default 2).")
flags.DEFINE_integer("layer", 7, "MoE layer of the routing statistics (7 is a recorded layer).")
flags.DEFINE_float("alpha", 0.8, "Share of a device's tokens from its home domain.")
flags.DEFINE_float("copies", 1.5, "DanceMoE expert slots per device as copies x E / N.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and activations.")
flags.DEFINE_integer("repeats", 20, "Timed calls per decode configuration (median reported).")
flags.DEFINE_integer("prefill_repeats", 10, "Timed calls per prefill configuration.")
flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
flags.DEFINE_bool("small", False, "Small shapes and token counts (CPU smoke test).")
flags.DEFINE_bool("slicing_check", True, "Compare stacked vs per-layer slot weights.")
flags.DEFINE_integer("seed", 0, "Seed of the traces and weights.")
flags.DEFINE_string("out", "results/bench_dispatch", "Output folder (bench_dispatch.md/.json).")

SMALL_SHAPES = dict(olmoe_1b_7b=(64, 32), mixtral_8x7b=(64, 128))  # (d, f) with --small


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  d: int
  f: int
  e: int
  k: int


@dataclasses.dataclass(frozen=True)
class Rates:
  """Rates measured in this process (per device)."""
  a2a_bytes_per_s: float
  a2a_latency_s: float
  matmul_flops: float
  hbm_bytes_per_s: float


def _median_time(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
  import jax  # noqa: PLC0415
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def measure_rates(mesh, dtype, small: bool, repeats: int) -> Rates:
  """``all_to_all`` bandwidth and latency over ``mesh``, matmul FLOP/s and HBM bytes/s."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from moe_edge.parallel.mesh import AXIS  # noqa: PLC0415
  n = mesh.shape[AXIS]
  item = jnp.dtype(dtype).itemsize
  sharding = NamedSharding(mesh, P(AXIS))
  a2a = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, AXIS, 0, 0, tiled=True),
                              mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))

  def a2a_time(per_device_bytes: int) -> float:
    rows = max(n, per_device_bytes // (1024 * item) // n * n)
    x = jax.jit(lambda: jnp.ones((n * rows, 1024), dtype), out_shardings=sharding)()
    t, _ = _median_time(lambda: a2a(x), repeats, 2)
    return t, rows * 1024 * item

  t_big, nbytes = a2a_time((1 if small else 256) * 2**20)
  lat, _ = a2a_time(n * 1024 * item)
  sent = nbytes * (n - 1) / n  # bytes each device sends to the others
  size = 256 if small else 8192
  a = jax.device_put(jnp.ones((size, size), dtype), mesh.devices.flat[0])
  mm = jax.jit(lambda u: u @ u)
  t_mm, _ = _median_time(lambda: mm(a), repeats, 2)
  v = jax.device_put(jnp.ones(((8 if small else 1024) * 2**20 // item,), dtype),
                     mesh.devices.flat[0])
  inc = jax.jit(lambda u: u + jnp.asarray(1, dtype))
  t_hbm, _ = _median_time(lambda: inc(v), repeats, 2)
  return Rates(a2a_bytes_per_s=sent / max(t_big - lat, 1e-9), a2a_latency_s=lat,
               matmul_flops=2.0 * size**3 / t_mm, hbm_bytes_per_s=2.0 * v.nbytes / t_hbm)


def ragged_dot_lowering(shape: Shape, dtype) -> str:
  """How XLA compiles ``ragged_dot`` at this shape on device 0: ``"cudnn"`` (grouped GEMM
  custom call), ``"custom call <target>"``, ``"ragged-dot"`` (kept as one op) or ``"dense"``
  (expanded into a padded dot over every group: rows x groups of work)."""
  import re  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  g = shape.e
  args = (jnp.ones((16 * g, shape.d), dtype), jnp.ones((g, shape.d, shape.f), dtype),
          jnp.full((g,), 16, jnp.int32))
  text = jax.jit(jax.lax.ragged_dot).lower(*args).compile().as_text()
  targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
  if any("cudnn" in t.lower() for t in targets):
    return "cudnn"
  if targets:
    return "custom call " + ",".join(targets)
  return "ragged-dot" if "ragged-dot(" in text else "dense"


def ragged_dot_work(fn, *args) -> tuple[int, int]:
  """``(rows, groups)`` of the largest ``ragged_dot`` in ``fn(*args)``'s jaxpr (per device:
  inside ``shard_map``): the static rows its grouped matmuls process and their group count.
  A dense expansion of ``ragged_dot`` (XLA:GPU's default) costs ``rows x groups`` rows of
  matmul work."""
  import jax  # noqa: PLC0415
  from jax.extend.core import jaxprs_in_params  # noqa: PLC0415
  best = (0, 0)

  def walk(jaxpr):
    nonlocal best
    for eqn in jaxpr.eqns:
      if eqn.primitive.name.startswith("ragged_dot"):
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        best = max(best, (int(lhs.shape[0]), int(rhs.shape[0])))
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return best


def routing(shape: Shape, n: int, tokens: int, alpha: float, layer: int, seed: int,
            request_len: int):
  """``(ids [N*T, k] int32, gates [N*T, k] float32)`` of one layer, device-major rows.

  ``request_len`` tokens share a request's domain: 1 for a decode step (``T`` concurrent
  requests, one token each), longer for prefill.
  """
  from moe_edge.workload.stats_traces import sample_stats_trace  # noqa: PLC0415
  trace = sample_stats_trace(shape.name, n, tokens, alpha, seed, request_len=request_len)
  ids, gates = [], []
  for s in range(n):
    sel = trace.server == s
    ids.append(trace.expert_ids[sel, layer])
    gates.append(trace.gate_weights[sel, layer])
  return np.concatenate(ids).astype(np.int32), np.concatenate(gates).astype(np.float32)


def plan(method: str, shape: Shape, n: int, freq: np.ndarray, rates: Rates, copies: float):
  """A one-layer placement by ``method`` for ``N`` devices with the measured rates."""
  from moe_edge.config import ClusterConfig, ServerSpec, model_config, uniform_links  # noqa
  from moe_edge.placement import place  # noqa: PLC0415
  from moe_edge.placement.problem import PlacementProblem  # noqa: PLC0415
  cfg = model_config(shape.name)
  cfg = dataclasses.replace(cfg, n_layers=cfg.first_dense_layers + 1, d_model=shape.d,
                            d_ff_expert=shape.f)
  spec = ServerSpec("bench_device", memory_bytes=1e15, peak_flops=rates.matmul_flops,
                    mem_bandwidth=rates.hbm_bytes_per_s)
  bw, lat = uniform_links(n, rates.a2a_bytes_per_s, rates.a2a_latency_s)
  cluster = ClusterConfig("bench", (spec,) * n, bw, lat)
  per = shape.e // n if method == "uniform_ep" else math.ceil(copies * shape.e / n)
  problem = PlacementProblem.build(cfg, cluster, freq, capacity=np.full(n, per))
  return place(method, problem, seed=0), cfg


# --------------------------------------------------------------------------------------------
# The MaxText-style baseline (per device, inside shard_map)
# --------------------------------------------------------------------------------------------
def _ffn(rows, group_sizes, wg, wu, wd):
  import jax  # noqa: PLC0415
  h = jax.nn.silu(jax.lax.ragged_dot(rows, wg, group_sizes)) * jax.lax.ragged_dot(rows, wu,
                                                                                   group_sizes)
  return jax.lax.ragged_dot(h, wd, group_sizes)


def _maxtext_device(x, ids, gates, wg, wu, wd, *, transport: str):
  """Uniform EP (device ``n`` holds experts ``[n E_loc, (n+1) E_loc)``), sort by expert,
  exchange, grouped matmul, exchange back, unpermute. Per-device shapes: ``x [T, d]``,
  ``ids/gates [T, k]``, ``wg/wu [1, E_loc, d, f]``, ``wd [1, E_loc, f, d]``."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from moe_edge.parallel.mesh import AXIS  # noqa: PLC0415
  n, me = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
  wg, wu, wd = wg[0], wu[0], wd[0]
  e_loc = wg.shape[0]
  t, k = ids.shape
  c = t * k
  flat = ids.reshape(c)
  order = jnp.argsort(flat, stable=True)            # grouped by expert, hence by device
  e_sorted = flat[order]
  xs = x[order // k]                                # [C, d] permuted rows
  dest = e_sorted // e_loc
  sizes = jnp.zeros((n,), jnp.int32).at[dest].add(1)
  offsets = jnp.cumsum(sizes) - sizes
  local_e = (e_sorted % e_loc).astype(jnp.int32)
  if transport == "padded":
    pos = jnp.arange(c, dtype=jnp.int32) - offsets[dest]
    slot = dest * c + pos                          # buffers sized to the max: C rows per pair
    buf = jnp.zeros((n * c, x.shape[1]), x.dtype).at[slot].set(xs)
    ebuf = jnp.full((n * c,), -1, jnp.int32).at[slot].set(local_e)
    recv = jax.lax.all_to_all(buf, AXIS, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(ebuf, AXIS, 0, 0, tiled=True)
  else:
    counts = jax.lax.all_gather(sizes, AXIS)       # [src, dst]
    out_off = (jnp.cumsum(counts, axis=0) - counts)[me]
    recv_sizes = counts[:, me]
    recv = jax.lax.ragged_all_to_all(xs, jnp.zeros((n * c, x.shape[1]), x.dtype), offsets,
                                     sizes, out_off, recv_sizes, axis_name=AXIS)
    recv_e = jax.lax.ragged_all_to_all(local_e, jnp.full((n * c,), -1, jnp.int32), offsets,
                                       sizes, out_off, recv_sizes, axis_name=AXIS)
  key = jnp.where(recv_e >= 0, recv_e, e_loc)
  order2 = jnp.argsort(key, stable=True)
  groups = jnp.zeros((e_loc,), jnp.int32).at[key].add(1, mode="drop")
  ys = _ffn(recv[order2], groups, wg.astype(x.dtype), wu.astype(x.dtype), wd.astype(x.dtype))
  out = jnp.zeros_like(ys).at[order2].set(ys)
  if transport == "padded":
    back = jax.lax.all_to_all(out, AXIS, 0, 0, tiled=True)
    y_sorted = back[slot]
  else:
    recv_off = jnp.cumsum(recv_sizes) - recv_sizes
    origin_off = (jnp.cumsum(counts, axis=1) - counts)[:, me]
    y_sorted = jax.lax.ragged_all_to_all(out, jnp.zeros((c, x.shape[1]), x.dtype), recv_off,
                                         recv_sizes, origin_off, sizes, axis_name=AXIS)
  y_choice = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", gates.astype(x.dtype), y_choice)


@functools.lru_cache(maxsize=None)
def maxtext_layer(mesh, transport: str):
  """The jitted baseline ``(x, ids, gates, wg, wu, wd) -> y`` over ``mesh``."""
  import jax  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from moe_edge.parallel.mesh import AXIS  # noqa: PLC0415
  fn = jax.shard_map(functools.partial(_maxtext_device, transport=transport), mesh=mesh,
                     in_specs=(P(AXIS),) * 6, out_specs=P(AXIS), check_vma=False)
  return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# One benchmark row
# --------------------------------------------------------------------------------------------
def _slot_arrays(mesh, weights, slot_expert: np.ndarray):
  """``{name: [N, S, ...]}`` gathered on device from replicated ``weights`` (no host copy)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from moe_edge.parallel.mesh import AXIS  # noqa: PLC0415
  rows = NamedSharding(mesh, P(AXIS))
  idx = jax.device_put(np.maximum(slot_expert, 0).astype(np.int32), rows)
  used = jax.device_put(slot_expert >= 0, rows)
  gather = jax.jit(lambda w, i, u: jnp.where(u[..., None, None], w[i], jnp.zeros((), w.dtype)),
                   out_shardings=rows)
  return {name: gather(w, idx, used) for name, w in weights.items()}


def bench_row(mesh, shape: Shape, phase: str, tokens: int, method: str, transport: str,
              placement, inputs, weights, host_ids, rates: Rates, repeats: int, warmup: int):
  """Time one configuration; return its row and its output (for the agreement check)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from moe_edge.parallel import dispatch as dispatch_lib  # noqa: PLC0415
  from moe_edge.parallel.mesh import AXIS, shard_rows, tables_from_placement  # noqa: PLC0415
  n = mesh.shape[AXIS]
  x, ids, gates, mask = inputs
  item = jnp.dtype(x.dtype).itemsize
  src = np.repeat(np.arange(n), tokens)[:, None]
  if method == "maxtext":
    e_loc = shape.e // n
    slot_expert = np.arange(shape.e).reshape(n, e_loc)
    dst = host_ids // e_loc
    w = _slot_arrays(mesh, weights, slot_expert)
    fn = maxtext_layer(mesh, transport)
    call = lambda: fn(x, ids, gates, w["w_gate"], w["w_up"], w["w_down"])  # noqa: E731
    check_stats = None
  else:
    tables = tables_from_placement(placement)
    route, dest_slot = tables.layer(0)
    slot_expert = tables.slot_expert[:, 0]
    dst = route[src, host_ids]
    w = _slot_arrays(mesh, weights, slot_expert)
    fn = dispatch_lib.layer_program(mesh, transport)
    r_dev, s_dev = shard_rows(route, mesh), shard_rows(dest_slot, mesh)
    call = lambda: fn(x, ids, gates, mask, r_dev, s_dev, w["w_gate"], w["w_up"],  # noqa: E731
                      w["w_down"])
    check_stats = True
  out = call()
  y = out[0] if check_stats else out
  ffn_rows, ffn_groups = ragged_dot_work(lambda: call())
  remote = dst != src                                             # [N*T, k]
  pair = np.zeros((n, n), np.int64)
  np.add.at(pair, (np.broadcast_to(src, dst.shape)[remote], dst[remote]), 1)
  stats_ok = None
  if check_stats:
    stats_ok = bool(np.array_equal(np.asarray(out[1].send_rows), pair))
  med, times = _median_time(call, repeats, warmup)

  # Bytes: real = remote rows x d x item, dispatch + combine; wire = what crosses devices.
  rows_real = int(pair.sum())
  real = 2 * rows_real * shape.d * item
  c = tokens * shape.k
  if transport == "padded":  # every device sends (N - 1) blocks of C rows (+ an int32 id each)
    wire = 2 * n * (n - 1) * c * shape.d * item + n * (n - 1) * c * 4
  else:  # exactly the rows, their int32 slot / expert ids, and the all-gathered counts
    wire = real + rows_real * 4 + n * (n - 1) * n * 4
  # Roofline of the busiest device: the rows it sends (dispatch to others, combine back to
  # them) over the a2a rate, expert FLOPs, weights of the experts it uses.
  per_dev_comm = (pair.sum(axis=1) + pair.sum(axis=0)) * shape.d * item
  computed = np.zeros((n,), np.int64)
  used = np.zeros((n, shape.e), bool)
  np.add.at(computed, dst.ravel(), 1)
  used[dst.ravel(), host_ids.ravel()] = True
  flops = computed * 2 * 3 * shape.d * shape.f
  wbytes = used.sum(axis=1) * 3 * shape.d * shape.f * item
  terms = dict(comm=float(np.max(per_dev_comm) / rates.a2a_bytes_per_s),
               flops=float(np.max(flops) / rates.matmul_flops),
               weights=float(np.max(wbytes) / rates.hbm_bytes_per_s))
  roof = max(terms.values())
  row = dict(model=shape.name, phase=phase, tokens_per_device=tokens, method=method,
             transport=transport, experts_per_device=[int(v) for v in (slot_expert >= 0).sum(1)],
             coverage=float(1 - remote.mean()), ffn_rows=ffn_rows, ffn_groups=ffn_groups,
             median_ms=1e3 * med,
             p10_ms=1e3 * float(np.percentile(times, 10)),
             p90_ms=1e3 * float(np.percentile(times, 90)), remote_rows=rows_real,
             real_mb=real / 1e6, wire_mb=wire / 1e6, roofline_ms=1e3 * roof,
             bound=max(terms, key=terms.get), roofline_fraction=roof / med,
             stats_match_host=stats_ok)
  return row, y


def slicing_check(mesh, shape: Shape, tokens: int, dtype, repeats: int, warmup: int) -> dict:
  """Two MoE layers in one program: stacked ``[N, L, S, ...]`` slot weights sliced per layer
  vs one array per layer (the layout the serving runtime uses). Compiled temporary memory and
  median time of both."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from moe_edge.parallel import dispatch as dispatch_lib  # noqa: PLC0415
  from moe_edge.parallel.mesh import AXIS, shard_rows  # noqa: PLC0415
  n, layers = mesh.shape[AXIS], 2
  s = shape.e // n
  rows = NamedSharding(mesh, P(AXIS))
  key = jax.random.key(1)
  make = jax.jit(lambda kk, shp: (jax.random.normal(kk, shp, jnp.float32) *
                                  shp[-2] ** -0.5).astype(dtype),
                 static_argnums=1, out_shardings=rows)
  stacked = {nm: make(jax.random.fold_in(key, i), (n, layers, s) + dims)
             for i, (nm, dims) in enumerate((("w_gate", (shape.d, shape.f)),
                                             ("w_up", (shape.d, shape.f)),
                                             ("w_down", (shape.f, shape.d))))}
  per = [{nm: jax.jit(lambda a, l=l: a[:, l], out_shardings=rows)(a)
          for nm, a in stacked.items()} for l in range(layers)]
  e = np.arange(shape.e)
  route = shard_rows(np.broadcast_to(e % n, (n, shape.e)).astype(np.int32), mesh)
  dslot = shard_rows(np.broadcast_to(e // n, (n, shape.e)).astype(np.int32), mesh)
  rng = np.random.default_rng(0)
  x = shard_rows(rng.normal(size=(n * tokens, shape.d)).astype(np.float32), mesh).astype(dtype)
  ids = shard_rows(np.argsort(rng.random((n * tokens, shape.e)), 1)[:, :shape.k].astype(
      np.int32), mesh)
  g = shard_rows(np.full((n * tokens, shape.k), 1.0 / shape.k, np.float32), mesh)
  m = shard_rows(np.ones(n * tokens, bool), mesh)
  fn = dispatch_lib.layer_program(mesh, "padded")

  def run_stacked(x, w):
    for l in range(layers):
      x = x + fn(x, ids, g, m, route, dslot, w["w_gate"][:, l], w["w_up"][:, l],
                 w["w_down"][:, l])[0]
    return x

  def run_per(x, w):
    for l in range(layers):
      x = x + fn(x, ids, g, m, route, dslot, w[l]["w_gate"], w[l]["w_up"], w[l]["w_down"])[0]
    return x

  out = {}
  for name, f, w in (("stacked", run_stacked, stacked), ("per_layer", run_per, per)):
    jitted = jax.jit(f)
    compiled = jitted.lower(x, w).compile()
    mem = compiled.memory_analysis()
    med, _ = _median_time(lambda: jitted(x, w), repeats, warmup)
    out[name] = dict(temp_mb=(mem.temp_size_in_bytes / 1e6 if mem is not None else None),
                     median_ms=1e3 * med)
  out["slot_bytes_per_layer_mb"] = sum(a.nbytes for a in per[0].values()) / n / 1e6
  return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
COLUMNS = [("model", "model", "{}"), ("phase", "phase", "{}"),
           ("tokens_per_device", "tok/dev", "{}"), ("method", "method", "{}"),
           ("transport", "transport", "{}"), ("experts_per_device", "experts/dev", "{}"),
           ("coverage", "local", "{:.3f}"), ("ffn_rows", "FFN rows/dev", "{:,}"),
           ("ffn_groups", "groups", "{}"), ("median_ms", "median ms", "{:.3f}"),
           ("remote_rows", "remote rows", "{:,}"), ("real_mb", "real MB", "{:.2f}"),
           ("wire_mb", "wire MB", "{:.2f}"), ("roofline_ms", "roofline ms", "{:.3f}"),
           ("bound", "bound", "{}"), ("roofline_fraction", "of roofline", "{:.1%}"),
           ("vs_maxtext", "speedup vs maxtext", "{:.2f}x")]


def markdown(rows: list[dict]) -> str:
  head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
  sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
  body = ["| " + " | ".join(c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-"
                            for c in COLUMNS) + " |" for r in rows]
  return "\n".join([head, sep] + body)


def run(f, on_row=None) -> dict:
  """The benchmark the flags describe; returns the JSON summary. ``on_row(rows)`` is called
  after every measured row (to save partial results)."""
  if f.small and "jax" not in sys.modules:
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                 f"{flag}={f.num_devices or 2}").strip()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from moe_edge.config import model_config  # noqa: PLC0415
  from moe_edge.parallel.mesh import server_mesh, shard_rows  # noqa: PLC0415

  n = f.num_devices or jax.device_count()
  if n < 2:
    raise app.UsageError(f"need >= 2 devices to exchange anything, JAX sees "
                         f"{jax.device_count()}; on CPU use --small (it creates host devices).")
  mesh = server_mesh(n)
  backend = jax.default_backend()
  transports = f.transports or (["padded"] if backend == "cpu" else ["padded", "ragged"])
  if backend == "cpu" and "ragged" in transports:
    raise app.UsageError("transport ragged needs a GPU/TPU (ragged_all_to_all); use padded.")
  dtype = jnp.dtype(f.dtype)
  tokens = dict(decode=8 if f.small else f.decode_tokens,
                prefill=64 if f.small else f.prefill_tokens)
  repeats, warmup = (3, 1) if f.small else (f.repeats, f.warmup)
  phase_repeats = dict(decode=repeats, prefill=3 if f.small else f.prefill_repeats)
  rates = measure_rates(mesh, dtype, f.small, max(3, repeats // 2))
  print(f"{n} x {jax.devices()[0].device_kind} ({backend}); all_to_all "
        f"{rates.a2a_bytes_per_s / 1e9:.1f} GB/s per device (latency "
        f"{rates.a2a_latency_s * 1e6:.1f} us), matmul {rates.matmul_flops / 1e12:.1f} TFLOP/s, "
        f"HBM {rates.hbm_bytes_per_s / 1e9:.0f} GB/s", flush=True)

  rows, agreement, lowering = [], [], {}
  replicated = NamedSharding(mesh, P())
  for name in f.models:
    cfg = model_config(name)
    d, ff = SMALL_SHAPES[name] if f.small else (cfg.d_model, cfg.d_ff_expert)
    shape = Shape(name, d, ff, cfg.n_experts, cfg.top_k)
    try:
      lowering[name] = ragged_dot_lowering(shape, dtype)
    except Exception as e:  # noqa: BLE001
      lowering[name] = f"unknown ({type(e).__name__})"
    print(f"{name}: ragged_dot compiles to {lowering[name]}", flush=True)
    if shape.e % n:
      raise app.UsageError(f"{name}: E={shape.e} experts do not split over {n} devices "
                           f"(uniform EP needs E % N == 0).")
    key = jax.random.key(f.seed)
    gen = jax.jit(lambda kk, shp: (jax.random.normal(kk, shp, jnp.float32) *
                                   shp[-2] ** -0.5).astype(dtype),
                  static_argnums=1, out_shardings=replicated)
    weights = {nm: gen(jax.random.fold_in(key, i), (shape.e,) + dims)
               for i, (nm, dims) in enumerate((("w_gate", (d, ff)), ("w_up", (d, ff)),
                                               ("w_down", (ff, d))))}
    prof_ids, _ = routing(shape, n, 256 if f.small else 4096, f.alpha, f.layer, f.seed + 1,
                          request_len=128)
    freq = np.zeros((n, 1, shape.e))
    per = prof_ids.reshape(n, -1, shape.k)
    for s in range(n):
      freq[s, 0] = np.bincount(per[s].ravel(), minlength=shape.e) / per.shape[1]
    placements = {m: plan(m, shape, n, freq, rates, f.copies)[0]
                  for m in f.methods if m != "maxtext"}
    for phase in f.phases:
      t = tokens[phase]
      host_ids, host_gates = routing(shape, n, t, f.alpha, f.layer, f.seed,
                                     request_len=1 if phase == "decode" else min(128, t))
      rng = np.random.default_rng(f.seed)
      x = shard_rows(rng.normal(size=(n * t, d)).astype(np.float32), mesh).astype(dtype)
      inputs = (x, shard_rows(host_ids, mesh), shard_rows(host_gates, mesh),
                shard_rows(np.ones(n * t, bool), mesh))
      for transport in transports:
        outs, this = {}, []
        for method in f.methods:
          try:
            row, y = bench_row(mesh, shape, phase, t, method, transport,
                               placements.get(method), inputs, weights, host_ids, rates,
                               phase_repeats[phase], warmup)
            outs[method] = np.asarray(y.astype(jnp.float32))
            print(f"{name} {phase} {transport} {method}: {row['median_ms']:.3f} ms, "
                  f"{row['roofline_fraction']:.1%} of roofline ({row['bound']})", flush=True)
          except Exception as e:  # noqa: BLE001  (one failing configuration must not end a GPU run)
            row = dict(model=name, phase=phase, tokens_per_device=t, method=method,
                       transport=transport, error=f"{type(e).__name__}: {e}"[:500])
            print(f"{name} {phase} {transport} {method}: FAILED {row['error']}", flush=True)
          rows.append(row)
          this.append(row)
          if on_row is not None:
            on_row(rows)
        base = next((r for r in this if r["method"] == "maxtext" and "error" not in r), None)
        for r in this:
          if "error" not in r:
            r["vs_maxtext"] = base["median_ms"] / r["median_ms"] if base else None
        if len(outs) >= 2:
          ref = next(iter(outs.values()))
          scale = float(np.max(np.abs(ref))) or 1.0
          diff = max(float(np.max(np.abs(o - ref))) for o in outs.values()) / scale
          agreement.append(dict(model=name, phase=phase, transport=transport,
                                methods=sorted(outs), max_rel_diff=diff,
                                ok=diff <= (2e-2 if dtype == jnp.bfloat16 else 1e-4)))
  slicing = None
  if f.slicing_check:
    name = f.models[0]
    cfg = model_config(name)
    d, ff = SMALL_SHAPES[name] if f.small else (cfg.d_model, cfg.d_ff_expert)
    try:
      slicing = slicing_check(mesh, Shape(name, d, ff, cfg.n_experts, cfg.top_k),
                              tokens["decode"], dtype, repeats, warmup)
    except Exception as e:  # noqa: BLE001
      slicing = dict(error=f"{type(e).__name__}: {e}"[:500])
  return dict(devices=n, device_kind=str(jax.devices()[0].device_kind), backend=backend,
              dtype=f.dtype, alpha=f.alpha, layer=f.layer, copies=f.copies,
              rates=dataclasses.asdict(rates), ragged_dot_lowering=lowering, rows=rows,
              agreement=agreement,
              slicing=slicing, command=" ".join(sys.argv))


def report(summary: dict) -> str:
  r = summary["rates"]
  lines = [f"## Dispatch benchmark: {summary['devices']} x {summary['device_kind']} "
           f"({summary['backend']}, {summary['dtype']})", "",
           f"Command: `{summary['command']}`", "",
           f"Measured in-process: all_to_all {r['a2a_bytes_per_s'] / 1e9:.1f} GB/s per device "
           f"(small-message latency {r['a2a_latency_s'] * 1e6:.1f} us), matmul "
           f"{r['matmul_flops'] / 1e12:.1f} TFLOP/s, HBM {r['hbm_bytes_per_s'] / 1e9:.0f} GB/s. "
           f"Routing: statistics-driven traces, alpha {summary['alpha']}, layer "
           f"{summary['layer']}; DanceMoE with {summary['copies']}x E/N slots per device. "
           f"ragged_dot compiles to: " + ", ".join(f"{k} {v}" for k, v in
                                                   summary["ragged_dot_lowering"].items())
           + " (dense = a padded dot over every group).", "",
           markdown(summary["rows"]), ""]
  errors = [r for r in summary["rows"] if "error" in r]
  for r in errors:
    lines.append(f"FAILED: {r['model']} {r['phase']} {r['method']} {r['transport']}: "
                 f"{r['error']}")
  ok = all(a["ok"] for a in summary["agreement"])
  worst = max((a["max_rel_diff"] for a in summary["agreement"]), default=0.0)
  stats = all(r.get("stats_match_host") in (None, True) for r in summary["rows"])
  lines.append(f"Outputs of all configurations agree: {'yes' if ok else 'NO'} (largest "
               f"difference {worst:.2e} of the output scale). Dispatch statistics equal the "
               f"host count of remote rows: {'yes' if stats else 'NO'}.")
  s = summary["slicing"]
  if s and "error" in s:
    lines += ["", f"Slicing check failed: {s['error']}"]
  elif s:
    lines += ["", f"Slot weights per layer vs stacked (2 layers, {s['slot_bytes_per_layer_mb']:.1f}"
              f" MB of slots per layer and device): compiled temporary memory "
              f"{s['stacked']['temp_mb']:.1f} MB stacked vs {s['per_layer']['temp_mb']:.1f} MB "
              f"per layer; time {s['stacked']['median_ms']:.3f} ms vs "
              f"{s['per_layer']['median_ms']:.3f} ms."]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  known = ("dancemoe", "dancemoe_refined", "uniform_ep", "maxtext")
  unknown = [m for m in FLAGS.methods if m not in known]
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; use {', '.join(known)}.")
  cli.check_flags(FLAGS, at_least_1=("decode_tokens", "prefill_tokens", "num_devices",
                                     "repeats", "prefill_repeats"),
                  at_least_0=("warmup", "seed", "layer"),
                  ranges={"alpha": (0.0, 1.0, False), "copies": (1.0, math.inf, False)})
  out = Path(FLAGS.out)
  for name in ("bench_dispatch.md", "bench_dispatch.json"):
    check_output_file(out / name, overwrite=True)  # checked before the (long) benchmark

  def partial(rows):  # keep what was measured if the run is cut short
    atomic.write_json(out / "bench_dispatch.json", dict(complete=False, rows=rows))

  summary = run(FLAGS, partial)
  summary["complete"] = True
  text = report(summary)
  print(text)
  atomic.write_text(out / "bench_dispatch.md", text)
  atomic.write_json(out / "bench_dispatch.json", summary)
  print(f"wrote {out / 'bench_dispatch.md'} and {out / 'bench_dispatch.json'}")
  if not all(a["ok"] for a in summary["agreement"]) or any("error" in r
                                                          for r in summary["rows"]):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
