"""Helpers shared by the placement methods: greedy single-copy assignment and packaging a
``hosts`` array into a validated :class:`Placement` with timings and objective numbers."""
from __future__ import annotations

import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.routing import route_table
from moe_edge.placement.objective import objective_terms


def greedy_assign(cost: np.ndarray, order: np.ndarray, room: np.ndarray) -> np.ndarray:
  """Each item, in ``order``, takes its cheapest server that still has room (lowest id on ties).

  Args:
    cost: ``[K, N]`` cost of putting item k on server n.
    order: ``[K]`` permutation: the order in which items choose.
    room: ``[N]`` free slots per server (``room.sum() >= K``); not modified.
  Returns:
    ``[K]`` int64 server of each item.
  """
  k, n = cost.shape
  room = np.asarray(room, dtype=np.int64).copy()
  if room.sum() < k:
    raise PlacementError(f"{k} experts need a slot but the servers have only {room.sum()} free.")
  first = np.argmin(cost, axis=1)
  out = np.empty(k, dtype=np.int64)
  for i in order:
    j = first[i]
    if room[j] <= 0:
      pref = np.argsort(cost[i], kind="stable")
      j = pref[np.argmax(room[pref] > 0)]
    out[i] = j
    room[j] -= 1
  return out


def finish(problem: PlacementProblem, hosts: np.ndarray, method: str, start: float,
           info: dict | None = None, route: np.ndarray | None = None,
           lam: float = 1.0, slack: float = 0.1) -> Placement:
  """Route (nearest replica unless ``route`` is given), build, validate and annotate.

  ``info`` gains ``time_s`` (wall time from ``start`` to the built placement, routing included),
  ``objective``, ``comm``, ``compute``, ``coverage``, ``lam`` (objective.py) and the replica
  counts ``experts_hosted`` and ``extra_replicas``.
  """
  if route is None:
    route = route_table(hosts, problem.hardware, problem.traffic, slack)
  placement = Placement.from_hosts(hosts, problem.model, problem.cluster, route=route,
                                   method=method, info=info)
  elapsed = time.perf_counter() - start
  placement.validate(problem)
  terms = objective_terms(problem, placement, lam)
  placement.info.update(time_s=elapsed, **terms,
                        experts_hosted=int(placement.hosts.sum()),
                        extra_replicas=int(placement.hosts.sum() - np.prod(problem.shape[1:])))
  return placement
