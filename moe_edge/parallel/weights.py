"""Slot weights and live migration: the copy program that moves expert weights between devices.

A migration turns the slot arrays of one placement (``{name: [N, S, ...]}`` per MoE layer,
sharded over ``server``) into those of another, double buffered (the serving runtime's module
docstring, "Migration"):

1. :func:`stable_target`: kept experts keep their slots
   (:func:`moe_edge.migration.slots.assign_slots_stable`).
2. :func:`plan_copies`: each added replica's source, the live holder that finishes it earliest
   given the copy times of :meth:`moe_edge.core.hardware.Hardware.copy_time` and what it
   already sends (or checkpoint storage when no live server holds it).
3. :func:`copy_rounds`: the copies grouped into ``ppermute`` rounds of one layer, every source
   sending to at most one target and every pair carrying the same number of rows (no padding on
   the wire); :func:`storage_rows`: rows read from the checkpoint.
4. :func:`copy_program`: one jitted ``shard_map`` that builds the new slot arrays;
   :func:`prepare` runs it and returns a :class:`PendingMigration` to swap in.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moe_edge.config import ModelConfig
from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.migration.slots import assign_slots_stable
from moe_edge.parallel.errors import ServingError
from moe_edge.parallel.mesh import (AXIS, SlotTables, row_sharding, tables_from_placement,
                                    tables_on_mesh)


@dataclasses.dataclass(frozen=True)
class Copy:
  """One added replica: ``server`` receives expert ``(layer, expert)`` into ``slot`` from
  ``source`` (its slot ``source_slot``), or from checkpoint storage when ``source == -1``."""
  server: int
  layer: int
  expert: int
  slot: int
  source: int
  source_slot: int = -1


@dataclasses.dataclass(frozen=True)
class MigrationReport:
  """What a migration moved.

  Attributes:
    copies: the added replicas, in schedule order.
    kept: replicas that stayed in their slots (copied locally, nothing on the wire).
    dropped: replicas freed.
    expert_bytes: bytes of one expert (three matrices) in the runtime's dtype.
    rounds: collective rounds (``ppermute`` calls) of the copy program.
    wire_rows: expert rows the collectives carry (``= len(link_copies)``: no padding).
    num_slots: ``(S before, S after)``.
    seconds: wall time from launch until the new arrays were ready (``apply_placement`` only).
  """
  copies: tuple[Copy, ...]
  kept: int
  dropped: int
  expert_bytes: int
  rounds: int
  wire_rows: int
  num_slots: tuple[int, int]
  seconds: float = float("nan")

  @property
  def moves(self) -> int:
    return len(self.copies)

  @property
  def link_copies(self) -> tuple[Copy, ...]:
    return tuple(c for c in self.copies if c.source >= 0)

  @property
  def storage_copies(self) -> tuple[Copy, ...]:
    return tuple(c for c in self.copies if c.source < 0)

  @property
  def link_bytes(self) -> int:
    """Expert bytes copied between devices."""
    return len(self.link_copies) * self.expert_bytes

  @property
  def wire_bytes(self) -> int:
    """Bytes the copy program's collectives carry (equals :attr:`link_bytes`)."""
    return self.wire_rows * self.expert_bytes

  @property
  def storage_bytes(self) -> int:
    """Expert bytes read from checkpoint storage (failure recovery)."""
    return len(self.storage_copies) * self.expert_bytes



@dataclasses.dataclass(frozen=True, eq=False)
class ActiveState:
  """What serving reads: one consistent placement, its tables and slot arrays."""
  placement: Placement
  tables: SlotTables
  route: jax.Array
  dest_slot: jax.Array
  slots: tuple[dict[str, jax.Array], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class PendingMigration:
  """New slot arrays being built (or built) for ``placement``; swap them in with
  :meth:`moe_edge.parallel.runtime.ServingRuntime.commit`."""
  placement: Placement
  report: MigrationReport
  _active: ActiveState
  _base: ActiveState
  _program: Callable
  _args: tuple

  def program_text(self) -> str:
    """StableHLO of the copy program (to audit what crosses devices, see
    :func:`collective_permute_bytes`)."""
    return self._program.lower(*self._args).as_text()

  def ready(self) -> bool:
    """True when the copy program has finished on every local device."""
    return all(a.is_ready() for a in jax.tree.leaves(self._active.slots))

  def block(self) -> "PendingMigration":
    """Wait until the new slot arrays are complete."""
    jax.block_until_ready(self._active.slots)
    return self


def active_state(placement: Placement, tables: SlotTables, slots, mesh: Mesh) -> ActiveState:
  """What serving reads for ``placement``: its tables on ``mesh`` and its slot arrays."""
  dev = tables_on_mesh(tables, mesh)
  return ActiveState(placement, tables, dev["route"], dev["dest_slot"], tuple(slots))


@dataclasses.dataclass(frozen=True)
class CopyRound:
  """One ``ppermute`` of the copy program: ``rows`` experts per pair of layer ``layer``."""
  layer: int
  rows: int
  pairs: tuple[tuple[int, int], ...]
  send_slots: np.ndarray  # [N, rows] slot each source sends (0 on other devices)
  recv_slots: np.ndarray  # [N, rows] slot each target writes (S_new = none)


_PERMUTE = re.compile(r'"stablehlo\.collective_permute".*?source_target_pairs = dense<(.*?)> : '
                      r'tensor<(\d+)x2xi64>.*?: \(tensor<([^>]*)>\)')
_DTYPE_BYTES = dict(f64=8, f32=4, bf16=2, f16=2, i64=8, i32=4, i16=2, i8=1, ui8=1, i1=1)


def collective_permute_bytes(stablehlo_text: str) -> int:
  """Bytes all ``collective_permute`` ops of a lowered program send: for each op, its pairs
  times its (per-device) operand size. Raises ServingError on an unknown element type."""
  total = 0
  for _, pairs, tensor in _PERMUTE.findall(stablehlo_text):
    *dims, dtype = tensor.split("x")
    if dtype not in _DTYPE_BYTES:
      raise ServingError(f"collective_permute of element type {dtype!r} is not counted.")
    total += int(pairs) * int(np.prod([int(x) for x in dims])) * _DTYPE_BYTES[dtype]
  return total



def stable_target(base: Placement, slot_expert: np.ndarray, new: Placement,
                  failed: Sequence[int], problem: PlacementProblem | None) -> Placement:
  """``new`` with the stable slot assignment on ``slot_expert [N, L, S]`` (kept experts keep
  their slots), checked against the placement in use (``base``), the failed servers and the
  problem."""
  if new.hosts.shape != base.hosts.shape:
    raise ServingError(f"the new placement is {list(new.hosts.shape)} but the runtime serves "
                       f"{list(base.hosts.shape)} [N, L, E].")
  dead = sorted(failed)
  if dead and new.hosts[dead].any():
    raise ServingError(f"server(s) {dead} failed; a new placement must hold nothing there "
                       f"(plan it with migration.failed_problem).")
  try:
    new.validate(problem) if problem is not None else new.validate()
    slots = assign_slots_stable(slot_expert, new.hosts)
    target = Placement(new.hosts, new.route, slots, new.method, dict(new.info))
    target.validate()
  except PlacementError as e:
    raise ServingError(f"cannot apply the placement: {e}") from e
  return target


def plan_copies(old: Placement, new: Placement, failed: Sequence[int],
                hardware: Hardware | None, expert_bytes: int) -> list[Copy]:
  """Added replicas with their source: a live holder in ``old`` (least finishing time by
  ``hardware.copy_time(expert_bytes)``; the least-busy holder without hardware), or checkpoint
  storage (``-1``) when no live server holds the expert."""
  live = old.hosts.copy()
  live[sorted(failed)] = False
  old_slot, new_slot = old.expert_slot, new.expert_slot
  n_srv = live.shape[0]
  if hardware is not None:
    one = hardware.copy_time(expert_bytes)  # [N, N] seconds for one copy alone
  else:
    one = np.ones((n_srv, n_srv))
  busy = np.zeros(n_srv)  # seconds of copies each source already sends
  out = []
  for n, l, e in np.argwhere(new.hosts & ~old.hosts):
    holders = np.flatnonzero(live[:, l, e])
    if holders.size == 0:
      out.append(Copy(int(n), int(l), int(e), int(new_slot[n, l, e]), -1))
      continue
    m = int(holders[np.argmin(busy[holders] + one[holders, n])])
    busy[m] += one[m, n]
    out.append(Copy(int(n), int(l), int(e), int(new_slot[n, l, e]), m,
                    int(old_slot[m, l, e])))
  return out


def copy_rounds(copies: Sequence[Copy], n_srv: int, n_layers: int, s_new: int) -> list[CopyRound]:
  """Group link copies into ``ppermute`` rounds: per layer, pairs of equal row counts with
  distinct sources and distinct targets."""
  rounds = []
  for l in range(n_layers):
    by_pair: dict[tuple[int, int], list[Copy]] = {}
    for c in copies:
      if c.layer == l and c.source >= 0:
        by_pair.setdefault((c.source, c.server), []).append(c)
    by_count: dict[int, list[tuple[int, int]]] = {}
    for pair, cs in sorted(by_pair.items()):
      by_count.setdefault(len(cs), []).append(pair)
    for rows, pairs in sorted(by_count.items()):
      left = list(pairs)
      while left:
        src, dst, this, rest = set(), set(), [], []
        for m, n in left:
          if m in src or n in dst:
            rest.append((m, n))
          else:
            this.append((m, n))
            src.add(m)
            dst.add(n)
        send = np.zeros((n_srv, rows), np.int32)
        recv = np.full((n_srv, rows), s_new, np.int32)
        for m, n in this:
          send[m] = [c.source_slot for c in by_pair[(m, n)]]
          recv[n] = [c.slot for c in by_pair[(m, n)]]
        rounds.append(CopyRound(l, rows, tuple(this), send, recv))
        left = rest
  return rounds


def storage_rows(store: dict[str, np.ndarray], copies: Sequence[Copy], mesh: Mesh, n_layers: int,
                 s_new: int) -> list:
  """Per layer: ``({name: [N, R, ...]} rows read from the checkpoint ``store [L, E, ...]``,
  slots [N, R])`` or None (no storage copy in that layer)."""
  out = []
  n_srv = mesh.shape[AXIS]
  for l in range(n_layers):
    mine = [[c for c in copies if c.layer == l and c.source < 0 and c.server == n]
            for n in range(n_srv)]
    r = max(len(m) for m in mine)
    if r == 0:
      out.append(None)
      continue
    experts = np.full((n_srv, r), -1, np.int64)
    slots = np.full((n_srv, r), s_new, np.int32)
    for n, cs in enumerate(mine):
      experts[n, :len(cs)] = [c.expert for c in cs]
      slots[n, :len(cs)] = [c.slot for c in cs]
    rows = {}
    for name, w in store.items():

      def block(index, w=w, l=l, experts=experts):
        ids = experts[index[0]]
        got = w[l][np.maximum(ids, 0)]
        keep = (ids >= 0).reshape(ids.shape + (1,) * (w.ndim - 2))
        return np.where(keep, got, np.zeros((), w.dtype))[(slice(None),) + tuple(index[1:])]

      rows[name] = jax.make_array_from_callback((n_srv, r) + w.shape[2:],
                                                row_sharding(mesh), block)
    out.append((rows, slots))
  return out



def check_rounds(rounds: Sequence[CopyRound], n_srv: int) -> None:
  """Every collective of the copy program must be well formed on every backend: at least one
  pair, at least one row, no self pair (``ppermute`` to oneself), distinct sources and
  distinct targets, servers inside the mesh. A round breaking this is a planner bug; it is
  refused here rather than handed to the compiler."""
  for r in rounds:
    srcs, dsts = [m for m, _ in r.pairs], [n for _, n in r.pairs]
    bad = (not r.pairs or r.rows < 1 or any(m == n for m, n in r.pairs)
           or len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts)
           or not all(0 <= v < n_srv for v in srcs + dsts))
    if bad:
      raise ServingError(f"internal: malformed copy round (layer {r.layer}, rows {r.rows}, "
                         f"pairs {r.pairs}) for {n_srv} servers; please report it.")


def copy_program(mesh: Mesh, keep: np.ndarray, rounds: Sequence[CopyRound], store_slots: Sequence,
                 s_new: int) -> Callable:
  """The jitted ``shard_map`` that builds the new slot arrays (runtime module docstring, step 2).

  ``keep [N, L, S_old]`` bool: old slots copied locally; ``rounds``: the collectives (each
  non-empty, see :func:`check_rounds`; layers without copies emit none); ``store_slots``:
  per layer ``[N, R]`` target slots of checkpoint rows, or None.

  Each round is one ``ppermute`` of one buffer ``[rows, P]``: the round's rows of the slot
  weight matrices (fused ``w_gate_up`` and ``w_down``), flattened and concatenated (when they
  share a dtype; else one buffer per matrix), so the program has one collective per round and
  never a zero-size one.
  """
  n_layers = keep.shape[1]
  check_rounds(rounds, mesh.shape[AXIS])
  by_layer = [[r for r in rounds if r.layer == l] for l in range(n_layers)]

  def send(old: dict, src: jax.Array, pairs) -> dict:
    """``{name: [rows, ...]}`` the rows ``src`` of ``old``, sent along ``pairs``."""
    names = sorted(old)
    rows = {k: old[k][src] for k in names}
    if len({rows[k].dtype for k in names}) != 1:
      return jax.lax.ppermute(rows, AXIS, pairs)
    r = src.shape[0]
    flat = jnp.concatenate([rows[k].reshape(r, -1) for k in names], axis=1)
    got = jax.lax.ppermute(flat, AXIS, pairs)
    out, at = {}, 0
    for k in names:
      size = int(np.prod(rows[k].shape[1:]))
      out[k] = got[:, at:at + size].reshape(rows[k].shape)
      at += size
    return out

  def _migration_copy(old_slots, stored):
    me = jax.lax.axis_index(AXIS)
    out = []
    for l in range(n_layers):
      old = {k: v[0] for k, v in old_slots[l].items()}  # [S_old, ...]
      s_old = old["w_down"].shape[0]
      kmask = jnp.asarray(keep[:, l])[me]  # [S_old]
      new = {}
      for k, v in old.items():
        kept = jnp.where(kmask.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v))
        # jnp.pad, not zeros().at[:s_old].set(): the latter closes over zero-size index
        # constants, and XLA:GPU (JAX 0.11.2, Shardy) segfaulted compiling them.
        new[k] = jnp.pad(kept, [(0, s_new - s_old)] + [(0, 0)] * (v.ndim - 1))
      for rnd in by_layer[l]:
        got = send(old, jnp.asarray(rnd.send_slots)[me], [tuple(p) for p in rnd.pairs])
        dst = jnp.asarray(rnd.recv_slots)[me]
        new = {k: new[k].at[dst].set(got[k], mode="drop") for k in new}
      if store_slots[l] is not None:
        dst = jnp.asarray(store_slots[l])[me]
        new = {k: new[k].at[dst].set(stored[l][k][0].astype(new[k].dtype), mode="drop")
               for k in new}
      out.append({k: v[None] for k, v in new.items()})
    return tuple(out)

  fn = jax.shard_map(_migration_copy, mesh=mesh, in_specs=(P(AXIS), P(AXIS)),
                     out_specs=P(AXIS), check_vma=False)
  return jax.jit(fn)


def prepare(base: ActiveState, target: Placement, failed: Sequence[int],
            hardware: Hardware | None, store: dict[str, np.ndarray], expert_bytes: int,
            mesh: Mesh, model: ModelConfig) -> PendingMigration:
  """Launch the copy program from ``base`` to ``target`` (a :func:`stable_target` result);
  ``store`` holds the checkpointed expert weights ``{name: [L, E, ...]}``."""
  old = base.placement
  copies = plan_copies(old, target, failed, hardware, expert_bytes)
  n_srv, n_layers, s_old = base.tables.slot_expert.shape
  s_new = target.slot_expert.shape[2]
  old_se, new_se = base.tables.slot_expert, target.slot_expert
  keep = (old_se >= 0) & (old_se == new_se[:, :, :s_old])
  dropped = int(((old_se >= 0) & ~keep).sum())
  rounds = copy_rounds(copies, n_srv, n_layers, s_new)
  storage = storage_rows(store, copies, mesh, n_layers, s_new)
  program = copy_program(mesh, keep, rounds, [None if s is None else s[1] for s in storage],
                         s_new)
  args = (base.slots, tuple(None if s is None else s[0] for s in storage))
  new_slots = program(*args)
  tables = tables_from_placement(target, model=model)
  report = MigrationReport(
      copies=tuple(copies), kept=int(keep.sum()), dropped=dropped, expert_bytes=expert_bytes,
      rounds=len(rounds), wire_rows=sum(r.rows * len(r.pairs) for r in rounds),
      num_slots=(s_old, s_new))
  return PendingMigration(target, report, active_state(target, tables, new_slots, mesh), base,
                          program, args)
