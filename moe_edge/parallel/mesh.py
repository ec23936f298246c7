"""From a placement to devices: the ``server`` mesh, slot tables and sharded expert weights.

One mesh axis, ``server``, over the devices in their natural order: device ``n`` of the mesh *is*
server ``n`` of the cluster. A placement never reorders devices (XLA:GPU only supports the
natural, "IOTA", device assignment well); its expert-to-server mapping lives in the tables here:

  route      [N, L, E] int32  server a token on ``n`` sends expert ``(l, e)`` to (``n`` if local)
  dest_slot  [N, L, E] int32  slot of that expert on the destination server
  slot_expert[N, L, S] int32  expert held in each of a server's per-layer slots, ``-1`` empty

Every server holds ``S`` slots per layer (``S`` = the largest per-layer count over servers, or more
when padded on purpose so that placements of different shapes share one compiled program); empty
slots hold zero weights and are never addressed. ``slots_used [N, L]`` keeps the real counts for
memory accounting.

Token batches are laid out row-major over servers: rows ``[n * T, (n + 1) * T)`` of a
``[N * T, ...]`` array are server ``n``'s tokens (:func:`pack_rows` pads uneven batches and
returns the validity mask).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_edge.config import ModelConfig
from moe_edge.core.errors import MoeEdgeError
from moe_edge.placement.problem import Placement, PlacementError

AXIS = "server"


class MeshError(MoeEdgeError):
  """Devices, tables or weights do not fit together (wrong counts or shapes)."""


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------
def server_mesh(num_servers: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"server"`` over ``num_servers`` devices in natural (id) order.

  Args:
    num_servers: ``N``, the cluster's servers (``ClusterConfig.num_servers``).
    devices: the devices to use, exactly ``N`` of them. Default: the first ``N`` of
      ``jax.devices()`` (all processes' devices under ``jax.distributed``), which must hold at
      least ``N``.
  """
  if num_servers <= 0:
    raise MeshError(f"num_servers must be positive, got {num_servers}.")
  if devices is None:
    avail = jax.devices()
    if len(avail) < num_servers:
      raise MeshError(
          f"the cluster has {num_servers} servers but JAX sees {len(avail)} "
          f"{avail[0].platform} device(s); one device per server is needed. On CPU, start "
          f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={num_servers} (or set "
          f"jax.config.update('jax_num_cpu_devices', {num_servers}) before first use); on GPUs, "
          f"use more GPUs or more hosts via jax.distributed.initialize.")
    devices = avail[:num_servers]
  devices = list(devices)
  if len(devices) != num_servers:
    raise MeshError(f"got {len(devices)} devices for {num_servers} servers; pass exactly one "
                    f"device per server.")
  if len({d.id for d in devices}) != len(devices):
    raise MeshError("the same device appears twice; one device per server.")
  devices = sorted(devices, key=lambda d: d.id)
  return Mesh(np.array(devices, dtype=object), (AXIS,))


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``server`` (tokens, per-server tables and slot weights)."""
  return NamedSharding(mesh, P(AXIS))


def shard_rows(array, mesh: Mesh) -> jax.Array:
  """Place a host array ``[N * R, ...]`` (or ``[N, ...]``) with its leading axis over ``server``.

  Works under ``jax.distributed`` too: every process passes the same global array and only its
  own devices' rows are copied.
  """
  array = np.asarray(array)
  n = mesh.shape[AXIS]
  if array.ndim == 0 or array.shape[0] % n:
    raise MeshError(f"leading axis of shape {array.shape} must be a multiple of the {n} "
                    f"servers (rows [n*R, (n+1)*R) belong to server n); pad with pack_rows.")
  return jax.make_array_from_callback(array.shape, row_sharding(mesh), lambda idx: array[idx])


def pack_rows(per_server: Sequence[np.ndarray],
              rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Stack uneven per-server batches into ``[N * R, ...]`` plus a validity mask ``[N * R]``.

  Args:
    per_server: ``N`` arrays ``[T_n, ...]`` of the same trailing shape.
    rows: ``R``, rows per server (default ``max T_n``, at least 1).

  Returns:
    ``packed`` (zeros in the padding) and ``mask`` (True for real rows).
  """
  if not per_server:
    raise MeshError("pack_rows needs one array per server.")
  arrays = [np.asarray(a) for a in per_server]
  tail = arrays[0].shape[1:]
  for i, a in enumerate(arrays):
    if a.shape[1:] != tail:
      raise MeshError(f"server {i}'s rows have trailing shape {a.shape[1:]}, server 0's {tail}.")
  need = max(1, max(a.shape[0] for a in arrays))
  r = need if rows is None else int(rows)
  if r < need:
    raise MeshError(f"rows={r} per server is fewer than the {need} tokens one server has.")
  packed = np.zeros((len(arrays) * r,) + tail, dtype=arrays[0].dtype)
  mask = np.zeros(len(arrays) * r, dtype=bool)
  for i, a in enumerate(arrays):
    packed[i * r:i * r + a.shape[0]] = a
    mask[i * r:i * r + a.shape[0]] = True
  return packed, mask


def unpack_rows(packed: np.ndarray, mask: np.ndarray, num_servers: int) -> list[np.ndarray]:
  """Inverse of :func:`pack_rows`: the real rows of each server."""
  packed, mask = np.asarray(packed), np.asarray(mask, dtype=bool)
  r = packed.shape[0] // num_servers
  return [packed[i * r:(i + 1) * r][mask[i * r:(i + 1) * r]] for i in range(num_servers)]


# --------------------------------------------------------------------------------------------
# Slot tables
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SlotTables:
  """A placement as index tables for the dispatch (shapes in the module docstring).

  Attributes:
    route: ``[N, L, E]`` int32 destination server of each (source server, layer, expert).
    dest_slot: ``[N, L, E]`` int32 slot of that expert on the destination,
      ``= expert_slot[route[n, l, e], l, e]``.
    slot_expert: ``[N, L, S]`` int32 expert id per slot, ``-1`` empty.
    slots_used: ``[N, L]`` int32 real (unpadded) slots per server and layer.
  """
  route: np.ndarray
  dest_slot: np.ndarray
  slot_expert: np.ndarray
  slots_used: np.ndarray

  @property
  def num_servers(self) -> int:
    return int(self.route.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.route.shape[1])

  @property
  def num_experts(self) -> int:
    return int(self.route.shape[2])

  @property
  def num_slots(self) -> int:
    """``S``: slots per server and layer (the padded, compiled size)."""
    return int(self.slot_expert.shape[2])

  @property
  def experts_per_server(self) -> np.ndarray:
    """``[N]`` int64: experts each server really holds (for memory accounting)."""
    return self.slots_used.sum(axis=1, dtype=np.int64)

  def check_model(self, model: ModelConfig) -> None:
    """Raise MeshError unless the tables are for ``model``'s ``L`` MoE layers and ``E`` experts."""
    want = (model.n_moe_layers, model.n_experts)
    if (self.num_layers, self.num_experts) != want:
      raise MeshError(f"the placement covers [L, E] = [{self.num_layers}, {self.num_experts}] but "
                      f"model {model.name!r} has [{want[0]}, {want[1]}]; the placement was made "
                      f"for another model. Re-run the placement for {model.name!r}.")

  def check_mesh(self, mesh: Mesh) -> None:
    """Raise MeshError unless ``mesh`` has one device per server of these tables."""
    if AXIS not in mesh.shape:
      raise MeshError(f"mesh axes {tuple(mesh.shape)} lack {AXIS!r}; build it with server_mesh.")
    if mesh.shape[AXIS] != self.num_servers:
      raise MeshError(f"the placement has {self.num_servers} servers but the mesh has "
                      f"{mesh.shape[AXIS]} devices on axis {AXIS!r}; build the mesh with "
                      f"server_mesh({self.num_servers}).")

  def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
    """``(route [N, E], dest_slot [N, E])`` of MoE layer ``l``."""
    if not 0 <= l < self.num_layers:
      raise MeshError(f"layer {l} is outside [0, {self.num_layers}).")
    return self.route[:, l], self.dest_slot[:, l]


def tables_from_placement(placement: Placement, num_slots: int | None = None,
                          model: ModelConfig | None = None) -> SlotTables:
  """Slot tables of a (validated) placement.

  Args:
    placement: the placement; validated first.
    num_slots: pad every server to this many slots per layer (>= the placement's ``S``) so that
      placements of different shapes compile once and swap weights in place.
    model: when given, the placement must be for this model's ``L`` and ``E``.
  """
  try:
    placement.validate()
  except PlacementError as err:
    raise MeshError(f"cannot build slot tables from an invalid placement: {err}") from err
  slot_expert = np.asarray(placement.slot_expert, dtype=np.int32)
  s = slot_expert.shape[2]
  if num_slots is not None:
    if num_slots < s:
      raise MeshError(f"num_slots={num_slots} is smaller than the placement's {s} slots (the "
                      f"most experts one server holds in one layer).")
    pad = np.full(slot_expert.shape[:2] + (num_slots - s,), -1, dtype=np.int32)
    slot_expert = np.concatenate([slot_expert, pad], axis=2)
  route = np.asarray(placement.route, dtype=np.int32)
  expert_slot = placement.expert_slot
  _, ll, ee = np.indices(route.shape)
  dest_slot = expert_slot[route, ll, ee].astype(np.int32)
  tables = SlotTables(route=route, dest_slot=dest_slot, slot_expert=slot_expert,
                      slots_used=(slot_expert >= 0).sum(axis=2).astype(np.int32))
  if model is not None:
    tables.check_model(model)
  return tables


# --------------------------------------------------------------------------------------------
# Expert weights
# --------------------------------------------------------------------------------------------
WEIGHT_NAMES = ("w_gate", "w_up", "w_down")


def _checked_weights(w_gate, w_up, w_down, tables: SlotTables) -> dict[str, np.ndarray]:
  """The three ``[L, E, ...]`` expert weight arrays as host arrays, checked against ``tables``."""
  weights = dict(w_gate=np.asarray(w_gate), w_up=np.asarray(w_up), w_down=np.asarray(w_down))
  l, e = tables.num_layers, tables.num_experts
  for name, w in weights.items():
    if w.ndim != 4:
      raise MeshError(f"{name} must be [L, E, ...] with 4 axes, got shape {w.shape}.")
    if w.shape[:2] != (l, e):
      raise MeshError(f"{name} has [L, E] = {list(w.shape[:2])} but the placement covers "
                      f"[{l}, {e}]; the placement and the weights are for different models.")
  d, f = weights["w_gate"].shape[2:]
  if weights["w_up"].shape[2:] != (d, f) or weights["w_down"].shape[2:] != (f, d):
    raise MeshError(f"expert weights disagree: w_gate {weights['w_gate'].shape}, w_up "
                    f"{weights['w_up'].shape}, w_down {weights['w_down'].shape}; expected "
                    f"[L, E, d, f], [L, E, d, f], [L, E, f, d].")
  return weights


def _slot_rows(w: np.ndarray, slot: np.ndarray, servers, layers) -> np.ndarray:
  """``[len(servers), len(layers), S, ...]``: the experts in the slots (zeros where empty).

  ``w [L, E, ...]`` host weights, ``slot [N, L, S]`` the slot table.
  """
  servers, layers = list(servers), list(layers)
  sub = slot[np.ix_(servers, layers)]                                   # [n, l, S]
  rows = w[np.asarray(layers)[None, :, None], np.maximum(sub, 0)]        # [n, l, S, ...]
  keep = (sub >= 0).reshape(sub.shape + (1,) * (w.ndim - 2))
  return np.where(keep, rows, np.zeros((), w.dtype)).astype(w.dtype)


def shard_expert_weights(w_gate, w_up, w_down, tables: SlotTables,
                         mesh: Mesh) -> dict[str, jax.Array]:
  """Gather every server's experts into its slots and place them on its device.

  Args:
    w_gate, w_up: ``[L, E, d, f]`` routed expert weights (host or device arrays).
    w_down: ``[L, E, f, d]``.
    tables: the placement's slot tables.
    mesh: the ``server`` mesh (one device per server).

  Returns:
    ``{"w_gate": [N, L, S, d, f], "w_up": [N, L, S, d, f], "w_down": [N, L, S, f, d]}``, leading
    axis sharded over ``server``; slot ``s`` of server ``n`` holds expert
    ``slot_expert[n, l, s]``, empty slots are zero. Each device's block is built on its own (and
    under ``jax.distributed`` each process builds only its devices' blocks). For serving, prefer
    :func:`shard_layer_weights` (one array per layer: no per-layer slicing inside the program).
  """
  tables.check_mesh(mesh)
  weights = _checked_weights(w_gate, w_up, w_down, tables)
  n, l = tables.num_servers, tables.num_layers
  sharding = row_sharding(mesh)
  out = {}
  for name, w in weights.items():
    shape = (n, l, tables.num_slots) + w.shape[2:]

    def block(index, w=w):
      rows = _slot_rows(w, tables.slot_expert, range(*index[0].indices(n)), range(l))
      return rows[(slice(None),) + tuple(index[1:])]

    out[name] = jax.make_array_from_callback(shape, sharding, block)
  return out


def shard_layer_weights(w_gate, w_up, w_down, tables: SlotTables, mesh: Mesh,
                        fuse_gate_up: bool = False) -> tuple[dict[str, jax.Array], ...]:
  """Like :func:`shard_expert_weights`, but one separate array per MoE layer.

  Returns:
    ``L`` dicts ``{"w_gate": [N, S, d, f], "w_up": [N, S, d, f], "w_down": [N, S, f, d]}``,
    leading axis sharded over ``server``; with ``fuse_gate_up`` ``{"w_gate_up": [N, S, d, 2f],
    "w_down": ...}`` (gate in ``[..., :f]``: the grouped FFN then runs gate and up as one
    matmul). A layer's expert matmuls then read their weights straight from these buffers;
    slicing a stacked ``[N, L, S, ...]`` array per layer inside a jitted model is a separate
    slice op that a backend may materialise as a copy.
  """
  tables.check_mesh(mesh)
  weights = _checked_weights(w_gate, w_up, w_down, tables)
  if fuse_gate_up:
    weights = {"w_gate_up": np.concatenate([weights["w_gate"], weights["w_up"]], axis=-1),
               "w_down": weights["w_down"]}
  n = tables.num_servers
  sharding = row_sharding(mesh)
  out = []
  for layer in range(tables.num_layers):
    per = {}
    for name, w in weights.items():
      shape = (n, tables.num_slots) + w.shape[2:]

      def block(index, w=w, layer=layer):
        rows = _slot_rows(w, tables.slot_expert, range(*index[0].indices(n)), [layer])[:, 0]
        return rows[(slice(None),) + tuple(index[1:])]

      per[name] = jax.make_array_from_callback(shape, sharding, block)
    out.append(per)
  return tuple(out)


def tables_on_mesh(tables: SlotTables, mesh: Mesh) -> dict[str, jax.Array]:
  """``route`` and ``dest_slot`` as ``[N, L, E]`` int32 device arrays sharded over ``server``."""
  tables.check_mesh(mesh)
  return dict(route=shard_rows(tables.route, mesh), dest_slot=shard_rows(tables.dest_slot, mesh))


__all__ = ["AXIS", "MeshError", "SlotTables", "WEIGHT_NAMES", "pack_rows", "row_sharding",
           "server_mesh", "shard_expert_weights", "shard_layer_weights", "shard_rows",
           "tables_from_placement", "tables_on_mesh", "unpack_rows"]
