"""The ``topology_aware`` baseline: each expert once where its traffic's link time is least."""
from __future__ import annotations

import time

import numpy as np

from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish, greedy_assign
from moe_edge.placement.registry import NoOptions, PlacementContext, register


@register("topology_aware", "baseline")
def topology_aware(problem: PlacementProblem, options: NoOptions = NoOptions(),
                   context: PlacementContext = PlacementContext()) -> Placement:
  """Each expert, hottest first, once on the server with the least link time to its traffic.

  Expert (l, e) goes to ``argmin_n sum_m T[m, l, e] * link_time[m, n]`` among servers with room
  (no replicas). ``context.seed`` is unused (the method is deterministic).
  """
  start = time.perf_counter()
  n, l, e = problem.shape
  t = problem.traffic.reshape(n, l * e)
  tau = problem.hardware.link_time_per_token()
  cost = t.T @ tau  # [L*E, N]
  order = np.argsort(-t.sum(axis=0), kind="stable")
  owner = greedy_assign(cost, order, problem.capacity)
  hosts = np.zeros((n, l * e), dtype=bool)
  hosts[owner, np.arange(l * e)] = True
  return finish(problem, hosts.reshape(n, l, e), "topology_aware", start,
                dict(seed=context.seed))
