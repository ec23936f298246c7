"""Redundance: vanilla expert parallelism plus replicas of the most-loaded experts in the free
memory (the paper's "Redundance (replication)" baseline, ``docs/PAPER.md``).

It follows the redundant-experts idea of DeepSeek-V3's inference deployment (DeepSeek-V3
Technical Report, arXiv 2412.19437, section 3.4: "duplicates high-load experts and deploys them
redundantly") without EPLB's packing: locality plays no part, only load.

1. **One copy each**: ``uniform_ep`` (expert e of every layer on server ``e mod N``, spilling to
   the next server with room).
2. **Replicas**: every free slot, one at a time, goes to the expert (any layer) with the largest
   load per copy ``sum_n T[n, l, e] / copies(l, e)`` that a server with room does not hold yet,
   on the server with the most free slots among those (ties to the lower server id; equal loads
   to the lower (layer, expert)). It stops when memory is full or every server with room holds
   every expert.
3. **Routing**: nearest replica (``problem.nearest_replica_route``; ties within ``route_slack``
   spread to the least loaded replica).
"""
from __future__ import annotations

import dataclasses
import heapq
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.baselines import uniform_ep
from moe_edge.placement.common import finish
from moe_edge.placement.registry import PlacementContext, register


@dataclasses.dataclass(frozen=True)
class RedundanceOptions:
  """Options of :func:`redundance`.

  Attributes:
    route_slack: the nearest-replica route's tie slack (relative).
    max_copies: at most this many copies of one expert (``None``: one per server).
  """
  route_slack: float = 0.1
  max_copies: int | None = None

  def __post_init__(self):
    if not self.route_slack >= 0:
      raise PlacementError(f"redundance: route_slack={self.route_slack} must be >= 0.")
    if self.max_copies is not None and self.max_copies < 1:
      raise PlacementError(f"redundance: max_copies={self.max_copies} must be >= 1 or None.")


def replicate_hot(hosts: np.ndarray, load: np.ndarray, room: np.ndarray,
                  max_copies: int) -> np.ndarray:
  """Step 2 of the module docstring.

  Args:
    hosts: ``[N, K]`` bool, every item held once or more.
    load: ``[K]`` non-negative load of each item.
    room: ``[N]`` free slots per server.
  Returns:
    ``[N, K]`` hosts with the replicas added.
  """
  hosts = hosts.copy()
  room = np.asarray(room, dtype=np.int64).copy()
  copies = hosts.sum(axis=0)
  heap = [(-load[k] / copies[k], k) for k in range(load.size) if copies[k] < max_copies]
  heapq.heapify(heap)
  while heap and room.max() > 0:
    neg, k = heapq.heappop(heap)
    cand = np.flatnonzero(~hosts[:, k] & (room > 0))
    if cand.size == 0:
      continue
    s = cand[np.argmax(room[cand])]
    hosts[s, k] = True
    room[s] -= 1
    copies[k] += 1
    if copies[k] < max_copies:
      heapq.heappush(heap, (-load[k] / copies[k], k))
  return hosts


@register("redundance", "baseline", RedundanceOptions)
def redundance(problem: PlacementProblem, options: RedundanceOptions = RedundanceOptions(),
               context: PlacementContext = PlacementContext()) -> Placement:
  """Uniform expert parallelism plus hot-expert replicas (module docstring). Deterministic."""
  start = time.perf_counter()
  n, l, e = problem.shape
  base = uniform_ep(problem).hosts.reshape(n, l * e)
  room = problem.capacity - base.sum(axis=1)
  max_copies = n if options.max_copies is None else min(n, options.max_copies)
  hosts = replicate_hot(base, problem.traffic.sum(axis=0).reshape(-1), room, max_copies)
  info = dict(replicas_added=int(hosts.sum() - base.sum()))
  return finish(problem, hosts.reshape(n, l, e), "redundance", start, info,
                slack=options.route_slack)
