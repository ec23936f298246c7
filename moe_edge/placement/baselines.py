"""Baseline placements: ``uniform_ep``, ``random`` and ``greedy_local`` (``topology_aware``
is in ``topology.py``).

Each is a registered method ``method(problem, options, context) -> Placement`` (role ``baseline``,
no options; ``context.seed`` seeds ``random``); routing is the default nearest-replica route
(``moe_edge.core.routing.route_table`` on ``problem.hardware``). Capacities are respected and every
expert is hosted at least once; ``info`` records the wall time and the objective numbers
(``objective.py``).
"""
from __future__ import annotations

import time

import numpy as np

from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish
from moe_edge.placement.registry import NoOptions, PlacementContext, register

_NO, _CTX = NoOptions(), PlacementContext()


@register("uniform_ep", "baseline")
def uniform_ep(problem: PlacementProblem, options: NoOptions = _NO,
               context: PlacementContext = _CTX) -> Placement:
  """Vanilla expert parallelism: expert e of every layer on server ``e % N``, no replicas.

  When that server is full the expert spills to the next server (``+1 mod N``) with room.
  ``context.seed`` is unused (the method is deterministic).
  """
  start = time.perf_counter()
  n, l, e = problem.shape
  room = problem.capacity.astype(np.int64).copy()
  hosts = np.zeros((n, l, e), dtype=bool)
  spilled = 0
  for li in range(l):
    for ei in range(e):
      s = ei % n
      while room[s] <= 0:
        s = (s + 1) % n
      spilled += s != ei % n
      hosts[s, li, ei] = True
      room[s] -= 1
  return finish(problem, hosts, "uniform_ep", start,
                dict(seed=context.seed, spilled=int(spilled)))


@register("random", "baseline")
def random_placement(problem: PlacementProblem, options: NoOptions = _NO,
                     context: PlacementContext = _CTX) -> Placement:
  """Every expert once on a random server with room, then random replicas fill the rest.

  The first copies take a random permutation of all free slots (so a server is picked in
  proportion to its room); each server then fills its remaining slots with experts drawn
  uniformly, without replacement, among those it does not hold yet.
  """
  start = time.perf_counter()
  rng = np.random.default_rng(context.seed)
  n, l, e = problem.shape
  cap = problem.capacity.astype(np.int64)
  slots = rng.permutation(np.repeat(np.arange(n), cap))[:l * e]
  hosts = np.zeros((n, l * e), dtype=bool)
  hosts[slots, rng.permutation(l * e)] = True
  for s in range(n):
    free = np.flatnonzero(~hosts[s])
    room = int(cap[s] - hosts[s].sum())
    if room > 0 and free.size:
      hosts[s, rng.choice(free, size=min(room, free.size), replace=False)] = True
  return finish(problem, hosts.reshape(n, l, e), "random", start, dict(seed=context.seed))


@register("greedy_local", "baseline")
def greedy_local(problem: PlacementProblem, options: NoOptions = _NO,
                 context: PlacementContext = _CTX) -> Placement:
  """Each server fills its memory with its own hottest experts; then the rest are spread.

  1. Server n holds its ``capacity[n]`` experts of largest traffic ``T[n, l, e]`` (any layers).
  2. Step 1 leaves no room (a server that could hold every expert holds them all, and then
     every expert is hosted). Each expert u hosted nowhere, hottest (total traffic) first,
     replaces on server n the coldest expert x of n (by n's own traffic) that has another
     replica elsewhere, choosing the n that minimises ``T[n, x] - T[n, u]``. The total
     capacity covers every expert, so such an x always exists and every expert ends up hosted.

  ``context.seed`` is unused (deterministic). ``info["evictions_per_server"]`` counts
  the step-2 evictions of each server.
  """
  start = time.perf_counter()
  n, l, e = problem.shape
  k = l * e
  t = problem.traffic.reshape(n, k)
  cap = np.minimum(problem.capacity.astype(np.int64), k)
  hosts = np.zeros((n, k), dtype=bool)
  rank = np.argsort(-t, axis=1, kind="stable")
  for s in range(n):
    hosts[s, rank[s, :cap[s]]] = True
  count = hosts.sum(axis=0)

  # Per server, its held experts coldest first, and a pointer to the coldest evictable one.
  held = [rank[s, :cap[s]][::-1] for s in range(n)]
  ptr = np.zeros(n, dtype=np.int64)
  cold = np.full(n, np.inf)

  def advance(s):
    lst = held[s]
    while ptr[s] < lst.size and (not hosts[s, lst[ptr[s]]] or count[lst[ptr[s]]] < 2):
      ptr[s] += 1
    cold[s] = t[s, lst[ptr[s]]] if ptr[s] < lst.size else np.inf

  for s in range(n):
    advance(s)
  evicted = np.zeros(n, dtype=np.int64)
  uncovered = np.flatnonzero(count == 0)
  uncovered = uncovered[np.argsort(-t[:, uncovered].sum(axis=0), kind="stable")]
  for u in uncovered:
    s = int(np.argmin(cold - t[:, u]))
    x = held[s][ptr[s]]
    hosts[s, x] = False
    count[x] -= 1
    evicted[s] += 1
    advance(s)
    if count[x] == 1:
      h = int(np.argmax(hosts[:, x]))
      if ptr[h] < held[h].size and held[h][ptr[h]] == x:
        advance(h)
    hosts[s, u] = True
    count[u] = 1
  return finish(problem, hosts.reshape(n, l, e), "greedy_local", start,
                dict(seed=context.seed, evictions_per_server=evicted.tolist()))
