"""Placement-driven MoE dispatch and combine: one jitted ``shard_map`` over the ``server`` axis.

Every device is one server. It holds its own tokens ``x [T, d]`` (with their routing
``expert_ids [T, k]``, ``gates [T, k]`` and a validity ``mask [T]``) and its expert slots
``[S, d, f]``. One MoE layer on device ``n`` runs:

1. *Plan.* Every valid token-choice ``(t, r)`` gets its destination server
   ``route[n, l, e]`` and slot ``dest_slot[n, l, e]``. Choices whose destination is ``n`` are
   local and never leave the device; the others are remote.
2. *Counts.* The per-destination counts of remote choices are all-gathered into the
   ``[N, N]`` matrix ``counts[src, dst]``; every device then knows every offset.
3. *Dispatch.* One activation row per remote choice (not deduplicated per token) goes to its
   destination, with the slot it needs, by the chosen transport:

   * ``"padded"``: ``jax.lax.all_to_all`` of fixed ``[N, C_cap, d]`` per-destination buffers.
     ``C_cap`` defaults to ``T * k``, a bound no batch can exceed (a device has only ``T * k``
     choices), so nothing can overflow. Runs on every backend.
   * ``"ragged"``: ``jax.lax.ragged_all_to_all`` of exactly the remote rows, packed by
     destination. Needs a GPU (or TPU) backend: XLA:CPU does not implement it.

4. *Experts.* Local rows and received rows are sorted by slot (one sort; empty buffer rows
   last) and run through the SwiGLU FFN ``down(silu(x @ w_gate) * (x @ w_up))`` by
   :func:`moe_edge.kernels.grouped_ffn` (one group per slot; tokamax's Mosaic kernel on Hopper
   GPUs, ``jax.lax.ragged_dot`` elsewhere; gate and up as one matmul when the slot weights come
   fused, ``w_gate_up [N, S, d, 2f]``). Only ``T * k + (N - 1) * cap`` sorted rows enter the
   matmuls (:func:`ffn_rows`: the device's own choices plus what the others can send it; the
   own block of a padded receive buffer is always empty and is cut off).
5. *Combine.* Results of remote rows travel back the same way (one row per remote choice) and
   every token sums ``gates[t, r] * FFN_{e_r}(x_t)`` over its ``k`` choices.

No capacity factor, no dropped token. An explicit ``capacity`` (rows any server may send to any
one other server in a layer; :func:`required_capacity` computes a proven bound on the host)
only shrinks the buffers; if a batch needs more, the outputs are NaN (never silently wrong), the
statistics say ``overflow``, and :class:`MoEDispatch` raises :class:`DispatchError`.

Traffic accounting (what the cost model predicts exactly): for every layer, server ``n`` sends
``counts[n, m] * activation_bytes`` bytes to ``m`` in the dispatch, and ``m`` sends the same
number back to ``n`` in the combine.

Public API:
  make_moe_dispatch(mesh, tables, layer, transport, capacity) -> MoEDispatch
  MoEDispatch(x, expert_ids, gates, w_gate, w_up, w_down, mask=None, layer=None)
      -> (y [N*T, d], DispatchStats)
  distributed_moe_fn(mesh, tables, slot_weights, transport, capacity) -> moe_fn for
      ``MoETransformer(..., moe_fn=...)`` (slot weights per layer or stacked)
  layer_program(mesh, transport, capacity) -> the jitted layer with tables and weights as
      arguments (for runtimes that keep them on device, e.g. ``moe_edge.parallel.runtime``)
  required_capacity(tables, layer, expert_ids, mask) -> int, bucket_capacity(rows) -> int
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moe_edge import kernels
from moe_edge.core.errors import MoeEdgeError
from moe_edge.parallel.mesh import AXIS, SlotTables, WEIGHT_NAMES, shard_rows, tables_on_mesh

FUSED_WEIGHT_NAMES = ("w_gate_up", "w_down")

TRANSPORTS = ("padded", "ragged")


class DispatchError(MoeEdgeError):
  """Inputs to the distributed MoE layer are malformed, or the transport cannot run here."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchStats:
  """What one distributed MoE layer moved. Every array is replicated on every device.

  Attributes:
    send_rows: ``[N, N]`` int32, ``[src, dst]``: activation rows (remote token-choices) ``src``
      sent to ``dst`` in the dispatch; the combine returns the same number ``dst -> src``.
      The diagonal is zero (local choices never travel).
    local_choices: ``[N]`` int32 valid token-choices each server computed itself.
    remote_choices: ``[N]`` int32 valid token-choices each server sent away.
    overflow: ``[]`` bool, a pair needed more rows than an explicit ``capacity`` (the layer's
      output is NaN then).
  """
  send_rows: jax.Array
  local_choices: jax.Array
  remote_choices: jax.Array
  overflow: jax.Array

  def dispatch_bytes(self, activation_bytes: int) -> np.ndarray:
    """``[N, N]`` int64 bytes ``src -> dst`` of the dispatch (the combine is the transpose)."""
    return np.asarray(self.send_rows, dtype=np.int64) * int(activation_bytes)

  def link_bytes(self, activation_bytes: int) -> np.ndarray:
    """``[N, N]`` int64 bytes on each directed link ``n -> m``, dispatch plus combine."""
    b = self.dispatch_bytes(activation_bytes)
    return b + b.T


# --------------------------------------------------------------------------------------------
# Per-device pieces (run inside shard_map; shapes are per device)
# --------------------------------------------------------------------------------------------
def _exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.cumsum(a, axis=axis, dtype=jnp.int32) - a


def _grouped_ffn(rows: jax.Array, slots: jax.Array, weights: tuple, max_rows: int) -> jax.Array:
  """SwiGLU of every row through the expert in its slot (:func:`moe_edge.kernels.grouped_ffn`).

  Rows are sorted by slot (one stable sort; skipped rows last) and only the first ``max_rows``
  sorted rows enter the FFN: the caller proves that at most ``max_rows`` rows are real, so the
  cut drops only skipped rows (the grouped kernels then see ``max_rows`` rows, not ``R``).

  Args:
    rows: ``[R, d]``.
    slots: ``[R]`` int32 slot of each row, ``-1`` for rows to skip (their output is zero).
    weights: ``(w_gate_up [S, d, 2f], w_down [S, f, d])`` or
      ``(w_gate [S, d, f], w_up [S, d, f], w_down [S, f, d])``.
    max_rows: static bound on the rows with ``slots >= 0`` (``<= R``).

  Returns:
    ``[R, d]`` in the order of ``rows``.
  """
  w_in, w_down = (weights[0], weights[1]) if len(weights) == 2 else (weights[:2], weights[2])
  order, group_sizes = kernels.sort_by_group(slots, w_down.shape[0])
  order = order[:max_rows]  # real rows first, grouped by slot
  ys = kernels.grouped_ffn(rows[order], group_sizes, w_in, w_down)  # rows past the real: 0
  return jnp.zeros(rows.shape, ys.dtype).at[order].set(ys, unique_indices=True)


def ffn_rows(num_servers: int, choices: int, cap: int) -> int:
  """Static rows one device's grouped matmuls process: its ``choices = T * k`` own choices
  (only the local ones are real) plus ``cap`` rows from each of the ``N - 1`` other servers
  (a server never sends to itself, so the own block of a padded buffer is always empty)."""
  return choices + (num_servers - 1) * cap


def _padded_exchange(xc, slot, local, remote, dest, pos, counts, overflow, weights, cap):
  """Dispatch, experts and combine with fixed per-destination buffers (``all_to_all``).

  ``xc [C, d]`` rows of every choice; ``slot, dest, pos [C]``; ``local, remote [C]`` bool.
  Returns the FFN output of every choice, ``[C, d]`` (zero for invalid choices).
  """
  del counts
  n = jax.lax.axis_size(AXIS)
  c, d = xc.shape
  fits = remote & (pos < cap) & ~overflow
  buf_row = jnp.where(fits, dest * cap + pos, n * cap)  # out of range -> dropped
  send_x = jnp.zeros((n * cap, d), xc.dtype).at[buf_row].set(xc, mode="drop")
  send_s = jnp.full((n * cap,), -1, jnp.int32).at[buf_row].set(slot, mode="drop")
  recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0, tiled=True)  # block m: rows from server m
  recv_s = jax.lax.all_to_all(send_s, AXIS, 0, 0, tiled=True)
  rows = jnp.concatenate([xc, recv_x])
  slots = jnp.concatenate([jnp.where(local, slot, -1), recv_s])
  out = _grouped_ffn(rows, slots, weights, max_rows=ffn_rows(n, c, cap))
  back = jax.lax.all_to_all(out[c:], AXIS, 0, 0, tiled=True)  # block m: results from server m
  y_remote = jnp.where(fits[:, None], back[jnp.minimum(buf_row, n * cap - 1)], 0)
  return jnp.where(local[:, None], out[:c], y_remote)


def _ragged_exchange(xc, slot, local, remote, dest, pos, counts, overflow, weights, cap):
  """Dispatch, experts and combine with exactly the remote rows (``ragged_all_to_all``).

  Same arguments and result as :func:`_padded_exchange`; ``counts [N, N]`` is the global
  ``[src, dst]`` count matrix.
  """
  del pos
  n = jax.lax.axis_size(AXIS)
  me = jax.lax.axis_index(AXIS)
  c, d = xc.shape
  counts = jnp.where(overflow, 0, counts)  # on overflow nothing moves (outputs become NaN)
  send_sizes = counts[me]  # [N] rows I send to each server
  recv_sizes = counts[:, me]  # [N] rows each server sends me
  order = jnp.argsort(jnp.where(remote, dest, n), stable=True)  # remote rows grouped by dest
  in_off = _exclusive_cumsum(send_sizes)
  out_off = _exclusive_cumsum(counts, axis=0)[me]  # where my rows land on each destination
  r = max((n - 1) * cap, 1)
  recv_x = jax.lax.ragged_all_to_all(xc[order], jnp.zeros((r, d), xc.dtype), in_off, send_sizes,
                                     out_off, recv_sizes, axis_name=AXIS)
  recv_s = jax.lax.ragged_all_to_all(slot[order], jnp.full((r,), -1, jnp.int32), in_off,
                                     send_sizes, out_off, recv_sizes, axis_name=AXIS)
  rows = jnp.concatenate([xc, recv_x])
  slots = jnp.concatenate([jnp.where(local, slot, -1), recv_s])
  out = _grouped_ffn(rows, slots, weights, max_rows=ffn_rows(n, c, cap))
  recv_off = _exclusive_cumsum(recv_sizes)  # where each source's rows sit in my buffer
  origin_off = _exclusive_cumsum(counts, axis=1)[:, me]  # where each origin keeps rows for me
  back = jax.lax.ragged_all_to_all(out[c:], jnp.zeros((c, d), xc.dtype), recv_off, recv_sizes,
                                   origin_off, send_sizes, axis_name=AXIS)
  y_remote = jnp.zeros((c, d), xc.dtype).at[order].set(back)
  return jnp.where(local[:, None], out[:c], y_remote)


def _device_layer(x, expert_ids, gates, mask, route, dest_slot, *slot_weights, transport: str,
                  capacity: int | None):
  """One MoE layer on one server. Per-device shapes: ``x [T, d]``, ``expert_ids/gates [T, k]``,
  ``mask [T]``, ``route/dest_slot [1, E]``; ``slot_weights`` either ``w_gate_up [1, S, d, 2f],
  w_down [1, S, f, d]`` or ``w_gate, w_up [1, S, d, f], w_down [1, S, f, d]``.
  """
  n = jax.lax.axis_size(AXIS)
  me = jax.lax.axis_index(AXIS)
  t, k = expert_ids.shape
  c = t * k
  cap = c if capacity is None else int(capacity)
  ids = expert_ids.reshape(c)
  valid = jnp.repeat(mask, k)
  dest = route[0][ids]
  slot = dest_slot[0][ids]
  local = valid & (dest == me)
  remote = valid & (dest != me)
  onehot = (remote[:, None] & (dest[:, None] == jnp.arange(n)[None, :])).astype(jnp.int32)
  send_counts = onehot.sum(axis=0)  # [N]
  pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], axis=1)[:, 0] - 1
  counts = jax.lax.all_gather(send_counts, AXIS)  # [N, N] = [src, dst]
  overflow = jnp.any(counts > cap)
  xc = jnp.repeat(x, k, axis=0)  # [C, d]: one row per choice
  weights = tuple(w[0] for w in slot_weights)
  exchange = _padded_exchange if transport == "padded" else _ragged_exchange
  y_choice = exchange(xc, slot, local, remote, dest, pos, counts, overflow, weights, cap)
  y_choice = jnp.where(overflow, jnp.nan, y_choice).reshape(t, k, -1)
  g = jnp.where(mask[:, None], gates, 0).astype(x.dtype)
  y = jnp.einsum("tk,tkd->td", g, y_choice)
  stats = DispatchStats(
      send_rows=counts,
      local_choices=jax.lax.all_gather(local.sum(dtype=jnp.int32), AXIS),
      remote_choices=jax.lax.all_gather(remote.sum(dtype=jnp.int32), AXIS),
      overflow=overflow)
  return y, stats


@functools.lru_cache(maxsize=None)
def _compiled_layer(mesh: Mesh, transport: str, capacity: int | None) -> Callable:
  """The jitted ``shard_map`` layer for one (mesh, transport, capacity); shapes cache in jit."""
  rows = P(AXIS)
  stats_spec = DispatchStats(send_rows=P(), local_choices=P(), remote_choices=P(), overflow=P())
  layer = functools.partial(_device_layer, transport=transport, capacity=capacity)

  def fn(*args):  # 9 arguments (w_gate, w_up, w_down) or 8 (w_gate_up, w_down)
    return jax.shard_map(layer, mesh=mesh, in_specs=(rows,) * len(args),
                         out_specs=(rows, stats_spec), check_vma=False)(*args)

  return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def check_transport(mesh: Mesh, transport: str) -> None:
  """Raise DispatchError when ``transport`` is unknown or cannot run on ``mesh``'s backend."""
  if transport not in TRANSPORTS:
    raise DispatchError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}.")
  platform = mesh.devices.flat[0].platform
  if transport == "ragged" and platform == "cpu":
    raise DispatchError(
        "transport='ragged' needs a GPU (or TPU) backend: jax.lax.ragged_all_to_all is not "
        "implemented by XLA:CPU. Use transport='padded' on CPU (same result, fixed-size "
        "buffers).")


def _check_capacity(capacity: int | None) -> int | None:
  if capacity is None:
    return None
  if int(capacity) != capacity or capacity < 1:
    raise DispatchError(f"capacity must be a positive integer (rows per server pair) or None, "
                        f"got {capacity!r}.")
  return int(capacity)


def _check_layer_inputs(tables: SlotTables, x, expert_ids, gates, mask, w_gate, w_up, w_down):
  """Static shape checks of one layer's global inputs (and expert-id range when concrete)."""
  n, s = tables.num_servers, tables.num_slots
  if x.ndim != 2:
    raise DispatchError(f"x must be [N * T, d] token rows, got shape {x.shape}.")
  rows, d = x.shape
  if rows % n:
    raise DispatchError(f"x has {rows} rows, not a multiple of the {n} servers; pad every "
                        f"server to the same T with pack_rows and pass its mask.")
  if expert_ids.ndim != 2 or expert_ids.shape[0] != rows:
    raise DispatchError(f"expert_ids must be [N * T, k] = [{rows}, k], got {expert_ids.shape}.")
  if gates.shape != expert_ids.shape:
    raise DispatchError(f"gates shape {gates.shape} differs from expert_ids "
                        f"{expert_ids.shape}.")
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise DispatchError(f"expert_ids must be integers, got {expert_ids.dtype}.")
  if mask is not None and mask.shape != (rows,):
    raise DispatchError(f"mask must be [N * T] = [{rows}], got {mask.shape}.")
  want = dict(w_gate=(n, s, d, None), w_up=(n, s, d, None), w_down=(n, s, None, d))
  ff = None
  for name, w in zip(WEIGHT_NAMES, (w_gate, w_up, w_down)):
    shape = want[name]
    ok = w.ndim == 4 and all(a is None or a == b for a, b in zip(shape, w.shape))
    if not ok:
      raise DispatchError(
          f"{name} must be one layer's slot weights [N, S, "
          f"{'f, d' if name == 'w_down' else 'd, f'}] with N={n}, S={s}, d={d}; got "
          f"{w.shape}. Pass slot_weights[{name!r}][:, layer] from shard_expert_weights.")
    this_f = w.shape[2] if name == "w_down" else w.shape[3]
    if ff is not None and this_f != ff:
      raise DispatchError(f"expert FFN sizes disagree across w_gate/w_up/w_down ({ff} vs "
                          f"{this_f}).")
    ff = this_f
  if isinstance(expert_ids, jax.Array) and not isinstance(expert_ids, jax.core.Tracer):
    # A global array under jax.distributed: check the rows this process holds.
    ids = np.concatenate([np.asarray(s.data).ravel() for s in expert_ids.addressable_shards])
    if ids.size and (ids.min() < 0 or ids.max() >= tables.num_experts):
      raise DispatchError(f"expert ids must lie in [0, {tables.num_experts}), got range "
                          f"[{ids.min()}, {ids.max()}]; routing and placement disagree on E.")


# --------------------------------------------------------------------------------------------
# Public layer
# --------------------------------------------------------------------------------------------
class MoEDispatch:
  """One distributed MoE layer bound to a mesh, slot tables and a transport.

  Call with global arrays (leading axis over ``server``; host arrays are placed for you):

    y, stats = dispatch(x, expert_ids, gates, w_gate, w_up, w_down, mask=None, layer=None)

  * ``x [N*T, d]``, ``expert_ids [N*T, k] int``, ``gates [N*T, k]``, ``mask [N*T] bool``
    (default all valid; masked rows return zeros and send nothing).
  * ``w_gate/w_up [N, S, d, f]``, ``w_down [N, S, f, d]``: one layer's slot weights,
    ``shard_expert_weights(...)[name][:, layer]``.
  * ``layer``: the MoE layer whose tables to use, when not bound at construction.

  Returns ``y [N*T, d]`` (sharded like ``x``) and :class:`DispatchStats`. Compiles once per
  (mesh, transport, capacity, shapes); tables are arguments, so new placements of the same
  shapes reuse the program.
  """

  def __init__(self, mesh: Mesh, tables: SlotTables, layer: int | None = None,
               transport: str = "padded", capacity: int | None = None):
    tables.check_mesh(mesh)
    check_transport(mesh, transport)
    if layer is not None:
      tables.layer(layer)  # range check
    self.mesh, self.tables, self.layer = mesh, tables, layer
    self.transport, self.capacity = transport, _check_capacity(capacity)
    self._tables = tables_on_mesh(tables, mesh)
    self._fn = _compiled_layer(mesh, transport, self.capacity)

  def __call__(self, x, expert_ids, gates, w_gate, w_up, w_down, mask=None,
               layer: int | None = None) -> tuple[jax.Array, DispatchStats]:
    layer = self.layer if layer is None else layer
    if layer is None:
      raise DispatchError("no layer: pass layer= to make_moe_dispatch or to the call.")
    self.tables.layer(layer)
    x, expert_ids, gates = (self._place(a) for a in (x, expert_ids, gates))
    _check_layer_inputs(self.tables, x, expert_ids, gates, mask, w_gate, w_up, w_down)
    if mask is None:
      mask = np.ones(x.shape[0], dtype=bool)
    mask = self._place(mask)
    y, stats = self._fn(x, expert_ids.astype(jnp.int32), gates, mask.astype(bool),
                        self._tables["route"][:, layer], self._tables["dest_slot"][:, layer],
                        w_gate, w_up, w_down)
    if self.capacity is not None and bool(stats.overflow):
      need = int(np.asarray(stats.send_rows).max())
      raise DispatchError(
          f"layer {layer}: a server sends {need} rows to one other server but capacity="
          f"{self.capacity}; the output would be wrong, so it is refused. Use capacity="
          f"{bucket_capacity(need)} (see required_capacity) or capacity=None.")
    return y, stats

  def _place(self, a):
    return a if isinstance(a, jax.Array) else shard_rows(np.asarray(a), self.mesh)


def make_moe_dispatch(mesh: Mesh, tables: SlotTables, layer: int | None = None,
                      transport: str = "padded", capacity: int | None = None) -> MoEDispatch:
  """The distributed MoE layer (see :class:`MoEDispatch`).

  Args:
    mesh: ``server_mesh(N)``.
    tables: ``tables_from_placement(placement)``.
    layer: MoE layer whose route/slot tables to use (or pass ``layer=`` per call).
    transport: ``"padded"`` (``all_to_all``, any backend) or ``"ragged"``
      (``ragged_all_to_all``, GPU/TPU only).
    capacity: rows any server may send to any one other server in this layer; ``None`` is the
      safe static bound ``T * k``. Use :func:`required_capacity` / :func:`bucket_capacity`.
  """
  return MoEDispatch(mesh, tables, layer, transport, capacity)


# --------------------------------------------------------------------------------------------
# Capacity (host side)
# --------------------------------------------------------------------------------------------
def send_counts(tables: SlotTables, layer: int, expert_ids, mask=None) -> np.ndarray:
  """``[N, N]`` int64 remote token-choices ``[src, dst]`` of one layer, on the host.

  ``expert_ids [N*T, k]`` in the packed row layout (server ``n`` owns rows ``[n*T, (n+1)*T)``).
  """
  ids = np.asarray(expert_ids)
  n = tables.num_servers
  if ids.ndim != 2 or ids.shape[0] % n:
    raise DispatchError(f"expert_ids must be [N * T, k] with N={n}, got {ids.shape}.")
  t = ids.shape[0] // n
  src = np.repeat(np.arange(n), t)[:, None].repeat(ids.shape[1], axis=1)
  valid = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)[:, None].repeat(
      ids.shape[1], axis=1)
  dst = tables.route[src, layer, ids]
  keep = valid & (dst != src)
  return np.bincount((src * n + dst)[keep], minlength=n * n).reshape(n, n)


def required_capacity(tables: SlotTables, layer: int, expert_ids, mask=None) -> int:
  """The exact largest number of rows one server sends another in this layer and batch (>= 1)."""
  return max(1, int(send_counts(tables, layer, expert_ids, mask).max()))


def bucket_capacity(rows: int, minimum: int = 8) -> int:
  """Round a needed capacity up to a power of two (>= ``rows``), so few sizes are compiled."""
  if rows < 0:
    raise DispatchError(f"rows must be >= 0, got {rows}.")
  return max(int(minimum), 1 << max(0, int(rows) - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------
def layer_weights(tables: SlotTables, slot_weights) -> tuple[dict[str, jax.Array], ...]:
  """Per-layer fused slot weights ``L x {"w_gate_up": [N, S, d, 2f], "w_down": [N, S, f, d]}``.

  ``slot_weights`` is :func:`~moe_edge.parallel.mesh.shard_layer_weights`' tuple of per-layer
  dicts or :func:`~moe_edge.parallel.mesh.shard_expert_weights`' stacked dict
  ``{name: [N, L, S, ...]}``, with separate ``w_gate, w_up`` (fused here, once: a copy) or
  already fused ``w_gate_up`` (``fuse_gate_up=True`` there; used as is when per layer).
  """
  n, l, s = tables.num_servers, tables.num_layers, tables.num_slots
  if isinstance(slot_weights, dict):
    names = _weight_names(slot_weights, "slot_weights", "shard_expert_weights")
    for name in names:
      w = slot_weights[name]
      if w.ndim != 5 or w.shape[:3] != (n, l, s):
        raise DispatchError(f"slot_weights[{name!r}] must be [N, L, S, ...] = [{n}, {l}, {s}, "
                            f"...], got {w.shape}; rebuild it from these tables.")
    per = tuple({name: slot_weights[name][:, layer] for name in names} for layer in range(l))
  else:
    per = tuple(slot_weights)
    if len(per) != l:
      raise DispatchError(f"per-layer slot_weights has {len(per)} layers but the tables have "
                          f"{l}; build it with shard_layer_weights from these tables.")
    for layer, wl in enumerate(per):
      for name in _weight_names(wl, f"slot_weights[{layer}]", "shard_layer_weights"):
        w = wl[name]
        if w.ndim != 4 or w.shape[:2] != (n, s):
          raise DispatchError(f"slot_weights[{layer}][{name!r}] must be [N, S, ...] = [{n}, "
                              f"{s}, ...], got {w.shape}; rebuild it from these tables.")
  return tuple(wl if "w_gate_up" in wl else
               {"w_gate_up": kernels.fuse_gate_up(wl["w_gate"], wl["w_up"]),
                "w_down": wl["w_down"]} for wl in per)


def _weight_names(weights: dict, what: str, builder: str) -> tuple[str, ...]:
  """The slot-weight names ``weights`` uses (fused or separate), or DispatchError."""
  names = FUSED_WEIGHT_NAMES if "w_gate_up" in weights else WEIGHT_NAMES
  missing = [k for k in names if k not in weights]
  if missing:
    raise DispatchError(f"{what} lacks {missing}; build it with {builder}.")
  return names


def layer_program(mesh: Mesh, transport: str = "padded",
                  capacity: int | None = None) -> Callable:
  """The jitted ``shard_map`` MoE layer, for callers that keep tables and weights on device.

  ``fn(x [N*T, d], expert_ids [N*T, k] int32, gates [N*T, k], mask [N*T] bool,
  route [N, E] int32, dest_slot [N, E] int32, w_gate [N, S, d, f], w_up [N, S, d, f],
  w_down [N, S, f, d]) -> (y [N*T, d], DispatchStats)``, every argument sharded over
  ``server`` (leading axis). With fused slot weights the last three become
  ``w_gate_up [N, S, d, 2f], w_down [N, S, f, d]`` (gate and up run as one matmul). Usable
  inside an outer ``jax.jit`` with traced tables and weights,
  so one compiled program serves every placement of the same shapes. No input checks: use
  :class:`MoEDispatch` for checked calls.
  """
  check_transport(mesh, transport)
  return _compiled_layer(mesh, transport, _check_capacity(capacity))


class DistributedMoE:
  """A ``moe_fn`` for ``MoETransformer(tokens, moe_fn=...)`` that dispatches per placement.

  The model's batch axis is split over ``server`` (``B`` a multiple of ``N``; batch row ``b``
  belongs to server ``b // (B / N)``), and every MoE layer runs :class:`MoEDispatch` on the
  slot weights given here; the model's own dense expert weights passed to the call are only
  shape-checked. Usable inside ``jax.jit``. Inside a jitted model an overflowing explicit
  ``capacity`` cannot raise: the layer output is NaN instead.

  ``slot_weights`` is per layer (:func:`~moe_edge.parallel.mesh.shard_layer_weights`, used as
  is) or stacked (:func:`~moe_edge.parallel.mesh.shard_expert_weights`, split into per-layer
  arrays once here), so each layer's expert matmuls read whole buffers rather than a slice
  taken inside the program; gate and up are fused into one ``[N, S, d, 2f]`` array per layer
  unless given fused (see :func:`layer_weights`).
  """

  def __init__(self, mesh: Mesh, tables: SlotTables, slot_weights,
               transport: str = "padded", capacity: int | None = None):
    tables.check_mesh(mesh)
    check_transport(mesh, transport)
    self.mesh, self.tables = mesh, tables
    self.layer_weights = layer_weights(tables, slot_weights)
    self.transport, self.capacity = transport, _check_capacity(capacity)
    self._tables = tables_on_mesh(tables, mesh)
    self._fn = _compiled_layer(mesh, transport, self.capacity)

  def __call__(self, layer, x, expert_ids, gates, w_gate=None, w_up=None, w_down=None):
    """``x [B, S, d]``, ``expert_ids/gates [B, S, k]`` -> ``[B, S, d]``."""
    b, sq, d = x.shape
    n = self.tables.num_servers
    if b % n:
      raise DispatchError(f"batch of {b} sequences is not a multiple of the {n} servers; every "
                          f"server needs the same number of sequences (pad the batch).")
    w = self.layer_weights[layer]
    if w_gate is not None:
      want = (self.tables.num_experts, d, w["w_down"].shape[-2])
      if tuple(w_gate.shape) != want:
        raise DispatchError(f"the model's layer-{layer} experts are {tuple(w_gate.shape)} but "
                            f"the slot weights are for [E, d, f] = {list(want)}; the placement "
                            f"or its weights belong to another model.")
    k = expert_ids.shape[-1]
    y, _ = self._fn(x.reshape(b * sq, d), expert_ids.reshape(b * sq, k).astype(jnp.int32),
                    gates.reshape(b * sq, k), jnp.ones((b * sq,), bool),
                    self._tables["route"][:, layer], self._tables["dest_slot"][:, layer],
                    w["w_gate_up"], w["w_down"])
    return y.reshape(b, sq, d)


def distributed_moe_fn(mesh: Mesh, tables: SlotTables, slot_weights,
                       transport: str = "padded", capacity: int | None = None) -> DistributedMoE:
  """``moe_fn(layer, x [B,S,d], expert_ids [B,S,k], gates [B,S,k], w_gate, w_up, w_down)``
  running every MoE layer distributed per ``tables`` (see :class:`DistributedMoE`);
  ``slot_weights`` per layer or stacked (:func:`layer_weights`)."""
  return DistributedMoE(mesh, tables, slot_weights, transport, capacity)
