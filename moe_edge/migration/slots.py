r"""Slot tables across migrations: kept experts keep their slots.

A migration changes which experts a server holds; the dispatch addresses a server's experts by
*slot* (``slot_expert [N, L, S]``, DESIGN.md's Placement format). :func:`assign_slots_stable`
keeps every expert that stays on a server in its old slot, so a migration rewrites only the
slots of added replicas and the compiled dispatch keeps its shapes (``S`` never shrinks).
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement
from moe_edge.core.routing import route_table


class MigrationError(PlacementError):
  """A migration request is malformed or cannot be carried out."""


def assign_slots_stable(old_slot_expert: np.ndarray, new_hosts: np.ndarray,
                        num_slots: int | None = None) -> np.ndarray:
  """Slot table for ``new_hosts`` in which every kept expert stays in its old slot.

  Args:
    old_slot_expert: ``[N, L, S_old]`` int32, the current slot table (``-1`` empty).
    new_hosts: ``[N, L, E]`` bool, the new placement.
    num_slots: slots per layer of the result; default ``max(S_old, needed)`` (never shrinks,
      so the dispatch keeps its compiled shapes). Raises if smaller than needed.
  Returns:
    ``[N, L, S]`` int32: kept experts (in both old and new hosts) at their old slot index; new
    experts, in increasing id, in the lowest free slots (freed by dropped experts or empty).
  """
  old = np.asarray(old_slot_expert)
  hosts = np.asarray(new_hosts, dtype=bool)
  n_srv, n_lay, n_exp = hosts.shape
  if old.ndim != 3 or old.shape[:2] != (n_srv, n_lay):
    raise MigrationError(f"old slot table must be [N, L, S] with [N, L] = [{n_srv}, {n_lay}], "
                         f"got {old.shape}.")
  s_old = old.shape[2]
  kept = np.zeros(old.shape, dtype=bool)
  valid = old >= 0
  nn, ll, ss = np.nonzero(valid)
  kept[nn, ll, ss] = hosts[nn, ll, old[nn, ll, ss]]
  count = hosts.sum(axis=2)
  last_kept = np.where(kept, np.arange(s_old)[None, None, :] + 1, 0).max(axis=2)
  # New experts fill free slots from the left; a (server, layer) needs count slots unless a kept
  # expert sits further right.
  need = int(np.maximum(count, last_kept).max()) if hosts.size else 0
  s = max(s_old, need) if num_slots is None else int(num_slots)
  if s < need:
    raise MigrationError(f"num_slots={s} is too small: keeping experts in their slots needs "
                         f"{need} slots per layer.")
  out = np.full((n_srv, n_lay, s), -1, dtype=np.int32)
  out[:, :, :s_old] = np.where(kept, old, -1)
  in_old = np.zeros(hosts.shape, dtype=bool)
  in_old[nn, ll, old[nn, ll, ss]] = kept[nn, ll, ss]
  for n in range(n_srv):
    for l in range(n_lay):
      new = np.flatnonzero(hosts[n, l] & ~in_old[n, l])
      if new.size:
        free = np.flatnonzero(out[n, l] < 0)[:new.size]
        out[n, l, free] = new
  return out


def placement_with_slots(hosts: np.ndarray, old: Placement, hardware: Hardware,
                         traffic: np.ndarray | None = None, method: str = "",
                         info: dict | None = None) -> Placement:
  """A validated :class:`Placement` for ``hosts`` whose slot table keeps ``old``'s kept experts
  in place (:func:`assign_slots_stable`) and whose route is the route table on ``hardware``
  (:func:`moe_edge.core.routing.route_table`)."""
  hosts = np.asarray(hosts, dtype=bool)
  route = route_table(hosts, hardware, traffic)
  p = Placement(hosts, route, assign_slots_stable(old.slot_expert, hosts), method,
                dict(info or {}))
  p.validate()
  return p


def changed_experts(current: Placement | np.ndarray, target: Placement | np.ndarray) -> int:
  """Number of experts ``(l, e)`` whose set of hosting servers differs."""
  a = current.hosts if isinstance(current, Placement) else np.asarray(current, dtype=bool)
  b = target.hosts if isinstance(target, Placement) else np.asarray(target, dtype=bool)
  return int(np.any(a != b, axis=0).sum())
