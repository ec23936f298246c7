r"""Cross-check: the cost model's per-step time against the real dispatch on host CPU devices.

On ``N`` host CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before JAX
starts), each device one server:

1. **Calibrate here.** :func:`moe_edge.cost.calibrate_local` times this CPU's expert kernel at the
   model's expert shape (float32) and fits its roofline; :func:`measure_links` times
   ``all_to_all`` on the server mesh at several sizes and fits ``t = latency + bytes / bandwidth``
   (bytes = what one device sends to the others). The cost model's cluster is
   :func:`moe_edge.cost.local_cluster` of that measurement with those links.
2. **Place** with a few methods on a profiling trace of the small model (recorded over real text
   for ``N`` servers), at ``copies`` expert memory.
3. **Run** the real MoE layer of ``make_moe_dispatch`` (``"padded"`` transport, capacity = the
   power-of-two bucket of the largest per-pair row count, so nothing overflows) for every MoE
   layer on prefill steps of the evaluation trace (one request per server per step), with the
   trace's expert ids replayed and random weights; time the jitted program (median of
   ``repeats`` calls per step and layer, after a compiling call) and sum over layers.
4. **Predict** the same steps with :func:`moe_edge.cost.evaluate` (phase ``prefill``, float32
   activations): the MoE layers' time ``sum_l dispatch + max_m compute + combine`` (the dense part
   is excluded: only the MoE layers run), and a *serialised* variant ``sum_l dispatch +
   sum_m compute + combine`` for a host where all servers share the same cores (here 8 simulated
   devices share the machine's cores, so their expert work does not run in parallel).
5. **Fixed cost.** The same program is also timed with every token masked (nothing is
   computed or sent that counts, but the padded buffers keep their size): the part of the
   measured time that does not depend on the routing at all.
6. **Bytes** the dispatch reports moving (``DispatchStats.send_rows``) must equal the cost
   model's dispatch bytes exactly.

Reported per placement: measured and predicted ms per step, their ratios, and whether the bytes
are equal.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_edge.config import ModelConfig, with_expert_memory
from moe_edge.core.errors import MoeEdgeError
from moe_edge.core.problem import PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost import Calibration, calibrate_local, evaluate, local_cluster, prefill_batches
from moe_edge.parallel.dispatch import (bucket_capacity, layer_program, make_moe_dispatch,
                                        required_capacity)
from moe_edge.parallel.mesh import (AXIS, server_mesh, shard_layer_weights, shard_rows,
                                    tables_from_placement, tables_on_mesh)
from moe_edge.placement import place


class CrosscheckError(MoeEdgeError, RuntimeError):
  """The cross-check cannot run here (too few devices, mismatched traces)."""


@dataclasses.dataclass(frozen=True)
class LinkFit:
  """``t = latency + bytes / bandwidth`` fitted to timed ``all_to_all`` calls.

  Attributes:
    latency: seconds (intercept, clipped at 0).
    bandwidth: bytes/s one device sends to the others.
    sent_bytes: ``[S]`` bytes each device sent to the others per timed call.
    seconds: ``[S]`` median seconds per call.
  """
  latency: float
  bandwidth: float
  sent_bytes: tuple[float, ...]
  seconds: tuple[float, ...]


def _median_time(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` (which blocks) over ``repeats`` calls after one warm-up."""
  fn()
  out = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return float(np.median(out))


def measure_links(mesh, d_model: int, rows: Sequence[int] = (1, 64, 512, 2048),
                  repeats: int = 7) -> LinkFit:
  """Time ``all_to_all`` of ``r`` float32 rows of ``d_model`` per device pair for each ``r``
  (increasing, at least two sizes)."""
  if len(rows) < 2 or list(rows) != sorted(set(rows)):
    raise CrosscheckError(f"rows must be at least two increasing sizes, got {tuple(rows)}.")

  n = mesh.shape[AXIS]
  fn = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, AXIS, 0, 0, tiled=True), mesh=mesh,
                             in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False))
  sent, secs = [], []
  for r in rows:
    x = shard_rows(np.ones((n * n * r, d_model), np.float32), mesh)
    secs.append(_median_time(lambda: jax.block_until_ready(fn(x)), repeats))
    sent.append(float((n - 1) * r * d_model * 4))
    del x
  # Bandwidth from the two largest sizes (the slope), latency from the smallest (what is left
  # of its time after the bytes): a least-squares line would let the large sizes set the
  # intercept.
  slope = (secs[-1] - secs[-2]) / (sent[-1] - sent[-2])
  if not slope > 0:
    raise CrosscheckError(f"all_to_all times {secs} do not grow with size {sent}; cannot fit a "
                          f"link bandwidth.")
  latency = max(secs[0] - slope * sent[0], 0.0)
  return LinkFit(float(latency), float(1.0 / slope), tuple(sent), tuple(secs))


def _step_batches(trace: ActivationTrace, steps: int) -> list[ActivationTrace]:
  """The first ``steps`` prefill steps (one request per server each) as separate traces."""
  pre = prefill_batches(trace, 1)
  ids = sorted(set(int(s) for s in pre.step))[:steps]
  return [pre.select(pre.step == s) for s in ids]


def _pack(step: ActivationTrace, num_servers: int, rows: int):
  """``(ids [N*T, L, k], gates [N*T, L, k], mask [N*T])``: server n's tokens in rows
  ``[n*T, n*T + count)``, the rest masked."""
  n_lay, k = step.num_layers, step.top_k
  ids = np.zeros((num_servers * rows, n_lay, k), np.int32)
  gates = np.zeros((num_servers * rows, n_lay, k), np.float32)
  mask = np.zeros(num_servers * rows, bool)
  for n in range(num_servers):
    sel = np.flatnonzero(step.server == n)
    if sel.size > rows:
      raise CrosscheckError(f"server {n} has {sel.size} tokens in a step, more than {rows}.")
    lo = n * rows
    ids[lo:lo + sel.size] = step.expert_ids[sel]
    gates[lo:lo + sel.size] = step.gate_weights[sel]
    mask[lo:lo + sel.size] = True
  return ids, gates, mask


def crosscheck(profile: ActivationTrace, trace: ActivationTrace, model: ModelConfig,
               methods: Sequence[str] = ("uniform_ep", "greedy_local", "dancemoe"),
               steps: int = 4, repeats: int = 3, copies: float = 1.5,
               seed: int = 0) -> tuple[list[dict], str]:
  """Run the cross-check (module docstring).

  Args:
    profile, trace: small-model traces for ``N`` servers (placement / timing).
    model: the model the traces belong to (run in float32: ``bytes_per_param`` 4).
    methods: placement methods to time.
    steps: prefill steps to time.
    repeats: timed calls per step and layer.
    copies: expert memory of the local cluster in copies of the experts.
  Returns:
    ``(rows, note)``: one row per method and a paragraph saying what was measured.
  """
  n = trace.num_servers
  if profile.num_servers != n:
    raise CrosscheckError(f"profile trace has {profile.num_servers} servers, trace {n}.")
  if jax.device_count() < n:
    raise CrosscheckError(
        f"the cross-check needs {n} devices but JAX sees {jax.device_count()}; set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX is imported.")
  m32 = dataclasses.replace(model, bytes_per_param=4)
  d, f, n_lay = m32.d_model, m32.d_ff_expert, m32.n_moe_layers
  act = 4 * d
  cal1 = calibrate_local(d_model=d, d_ff=f, token_counts=(1, 8, 64, 512), dtype="float32",
                         repeats=5, seed=seed)
  meas = cal1.measurements[0]
  mesh = server_mesh(n)
  links = measure_links(mesh, d)
  base = local_cluster(meas, n, link_bandwidth=links.bandwidth, link_latency=links.latency)
  cluster = with_expert_memory(base, m32, copies)
  cal = Calibration(np.full(n, cal1.flops_efficiency[0]), np.full(n, cal1.bw_efficiency[0]),
                    cal1.source, tuple(s.name for s in cluster.servers))
  problem = PlacementProblem.from_trace(profile, m32, cluster, calibration=cal)
  placements = {m: place(m, problem, seed=seed) for m in methods}
  batches = _step_batches(trace, steps)
  rows_per = max(int(np.bincount(b.server, minlength=n).max()) for b in batches)
  packed = [_pack(b, n, rows_per) for b in batches]
  slots = max(p.num_slots for p in placements.values())
  tables = {m: tables_from_placement(p, num_slots=slots, model=m32)
            for m, p in placements.items()}
  need = max(required_capacity(t, l, ids[:, l], mask) for t in tables.values()
             for ids, _, mask in packed for l in range(n_lay))
  cap = bucket_capacity(need)
  rng = np.random.default_rng(seed)
  scale = 1.0 / np.sqrt(d)
  w = dict(w_gate=rng.normal(0, scale, (n_lay, m32.n_experts, d, f)).astype(np.float32),
           w_up=rng.normal(0, scale, (n_lay, m32.n_experts, d, f)).astype(np.float32),
           w_down=rng.normal(0, scale, (n_lay, m32.n_experts, f, d)).astype(np.float32))
  program = layer_program(mesh, "padded", cap)
  x_host = rng.normal(0, 1, (n * rows_per, d)).astype(np.float32)
  x = shard_rows(x_host, mesh)
  dev_steps = [(shard_rows(ids, mesh), shard_rows(g, mesh), shard_rows(mask, mesh))
               for ids, g, mask in packed]
  no_tokens = shard_rows(np.zeros(n * rows_per, bool), mesh)
  out = []
  for name, p in placements.items():
    tab = tables[name]
    weights = shard_layer_weights(w["w_gate"], w["w_up"], w["w_down"], tab, mesh)
    on = tables_on_mesh(tab, mesh)
    route = [on["route"][:, l] for l in range(n_lay)]
    dest = [on["dest_slot"][:, l] for l in range(n_lay)]
    checked = make_moe_dispatch(mesh, tab, transport="padded", capacity=cap)
    moved, step_ms, masked_ms = _time_layers(program, checked, x, packed, dev_steps, no_tokens,
                                             route, dest, weights, act, repeats)
    timed = _concat_steps(batches, trace)
    rep = evaluate(timed, m32, cluster, p, "prefill", cal, activation_bytes=act)
    pred = 1e3 * float(rep.layer_time.sum())
    serial = 1e3 * float(rep.dispatch_time.sum() + rep.combine_time.sum() +
                         rep.server_compute.sum())
    measured = float(np.mean(step_ms))
    out.append(dict(method=name, steps=len(batches), tokens_per_server=rows_per,
                    capacity=cap, coverage=rep.coverage, measured_ms=measured,
                    predicted_ms=pred, ratio=measured / pred, predicted_serial_ms=serial,
                    ratio_serial=measured / serial,
                    measured_masked_ms=float(np.mean(masked_ms)),
                    cross_mb=float(rep.cross_bytes) / 1e6,
                    bytes_equal=bool(np.array_equal(moved, rep.dispatch_bytes))))
    del weights
  fe, be = cal.flops_efficiency[0], cal.bw_efficiency[0]
  note = (f"{n} host CPU devices ({meas.device_kind}, one per server) running the real MoE "
          f"layer of `make_moe_dispatch` (padded all_to_all, capacity {cap} rows per pair) on "
          f"{len(batches)} prefill steps of the small model's evaluation trace ({rows_per} "
          f"tokens per server per step, {n_lay} MoE layers, d={d}, f={f}, float32, replayed "
          f"routing, random weights), against the cost model on the same steps with this CPU's "
          f"calibration: expert kernel fitted at {meas.fitted()[0] / 1e9:.1f} GB/s and "
          f"{meas.fitted()[1] / 1e9:.1f} GFLOP/s (efficiency {fe:.2f} / {be:.2f} of the "
          f"{meas.matmul_flops / 1e9:.1f} GFLOP/s matmul and {meas.copy_bandwidth / 1e9:.1f} "
          f"GB/s copy micro-benchmarks), links fitted to all_to_all: latency "
          f"{1e6 * links.latency:.0f} us, {links.bandwidth / 1e9:.2f} GB/s per device. Times "
          f"cover the MoE layers only (sum over layers, mean over steps; dense part excluded). "
          f"'servers serialised' sums the servers' expert compute instead of taking the "
          f"slowest, as the simulated devices share the host's cores. 'all tokens masked' times "
          f"the same program with every token masked (padded buffers unchanged): its fixed cost. "
          f"Bytes: the bytes the "
          f"dispatch reports moving equal the cost model's, per layer and link.")
  return out, note


def _time_layers(program, checked, x, packed, dev_steps, no_tokens, route, dest, weights,
                 act: int, repeats: int):
  """Run and time every MoE layer of every step: ``(moved [L, N, N]`` dispatch bytes the
  checked dispatch reports, ``step_ms [S]``, ``masked_ms [S]`` (every token masked))."""
  n_lay = len(route)
  moved = None
  step_ms, masked_ms = [], []
  for (ids_h, gates_h, mask_h), (ids, gates, mask) in zip(packed, dev_steps):
    total = idle = 0.0
    for l in range(n_lay):
      _, stats = checked(x, ids_h[:, l], gates_h[:, l], mask=mask_h, layer=l, **weights[l])
      b = stats.dispatch_bytes(act)
      moved = np.zeros((n_lay,) + b.shape, np.int64) if moved is None else moved
      moved[l] += b
      args = [x, ids[:, l], gates[:, l], mask, route[l], dest[l], weights[l]["w_gate"],
              weights[l]["w_up"], weights[l]["w_down"]]
      total += _median_time(lambda a=args: jax.block_until_ready(program(*a)), repeats)
      args[3] = no_tokens  # the same program with every token masked: its fixed cost
      idle += _median_time(lambda a=args: jax.block_until_ready(program(*a)), repeats)
    step_ms.append(1e3 * total)
    masked_ms.append(1e3 * idle)
  return moved, step_ms, masked_ms


def _concat_steps(batches: Sequence[ActivationTrace], trace: ActivationTrace) -> ActivationTrace:
  """The timed steps as one trace (for the cost model)."""
  cat = lambda key: np.concatenate([getattr(b, key) for b in batches])  # noqa: E731
  return ActivationTrace(
      expert_ids=cat("expert_ids"), gate_weights=cat("gate_weights"), server=cat("server"),
      request=cat("request"), position=cat("position"), step=cat("step"), model=trace.model,
      num_experts=trace.num_experts, num_servers=trace.num_servers, source=trace.source)
