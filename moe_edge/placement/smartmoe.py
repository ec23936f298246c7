"""SmartMoE's load-balancing expert placement (Zhai et al., "SmartMoE: Efficiently Training
Sparsely-Activated Models through Combining Offline and Online Parallelization", USENIX ATC
2023; the paper's "SmartMoE" baseline, ``docs/PAPER.md``).

SmartMoE re-places experts across devices so that each device's expert load (tokens routed to
its experts) is balanced, keeping a fixed number of experts per device and no replicas; it sees
loads, not where tokens come from. (Its text was not readable here; this follows its published
description: balanced expert-to-device assignment, one copy per expert, fixed expert count per
device, by a greedy heaviest-first assignment.) On heterogeneous servers we keep the fixed counts
in proportion to memory and balance the load in tokens, as SmartMoE does:

1. **Experts per device**: each layer's ``E`` experts are split over servers in proportion to
   their capacity ``C[n]`` (largest remainder, ties to the lower id), at most
   ``floor(C[n] / L)`` per layer, so the placement fits every layer's quota on every server.
   (The project's problem guarantees ``sum_n C[n] >= L E``; if the floors fall short of ``E`` in
   a layer, the rest goes to servers with memory left, largest first.)
2. **Balance**: per layer, experts in decreasing load ``sum_n T[n, l, e]`` (ties to the lower id)
   each go to the server with the least load so far that has quota left (ties to the lower id).
3. **Routing**: the one copy (``problem.nearest_replica_route``).
Memory beyond one copy of each expert stays unused.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish
from moe_edge.placement.registry import PlacementContext, register


@dataclasses.dataclass(frozen=True)
class SmartMoEOptions:
  """Options of :func:`smartmoe` (none needed; kept so every method has its options type)."""


def layer_quota(capacity: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
  """``[L, N]`` experts of each layer per server (step 1 of the module docstring)."""
  cap = np.asarray(capacity, dtype=np.int64)
  per_layer = np.minimum(cap // num_layers, num_experts)
  share = num_experts * cap / cap.sum()
  quota = np.minimum(np.floor(share).astype(np.int64), per_layer)
  order = np.argsort(-(share - quota), kind="stable")
  for s in order:  # largest remainders first, within each server's per-layer room
    if quota.sum() >= num_experts:
      break
    if quota[s] < per_layer[s]:
      quota[s] += 1
  quota = np.broadcast_to(quota, (num_layers, cap.size)).copy()
  if quota.sum(axis=1).min() < num_experts:  # floors too small: spill into leftover memory
    left = cap - quota.sum(axis=0)
    for li in range(num_layers):
      while quota[li].sum() < num_experts:
        ok = np.flatnonzero((left > 0) & (quota[li] < num_experts))
        if ok.size == 0:
          raise PlacementError(f"smartmoe: layer {li} cannot hold its {num_experts} experts.")
        s = ok[np.argmax(left[ok])]
        quota[li, s] += 1
        left[s] -= 1
  return quota


def balance_layer(load: np.ndarray, quota: np.ndarray) -> np.ndarray:
  """``[E]`` server of each expert: heaviest first to the least-loaded server with quota."""
  owner = np.empty(load.size, dtype=np.int64)
  srv_load = np.zeros(quota.size)
  left = quota.astype(np.int64).copy()
  for x in np.argsort(-load, kind="stable"):
    s = int(np.argmin(np.where(left > 0, srv_load, np.inf)))
    owner[x] = s
    srv_load[s] += load[x]
    left[s] -= 1
  return owner


@register("smartmoe", "baseline", SmartMoEOptions, label="SmartMoE")
def smartmoe(problem: PlacementProblem, options: SmartMoEOptions = SmartMoEOptions(),
             context: PlacementContext = PlacementContext()) -> Placement:
  """SmartMoE-style load-balanced placement, one copy per expert (module docstring)."""
  start = time.perf_counter()
  n, l, e = problem.shape
  quota = layer_quota(problem.capacity, l, e)
  load = problem.traffic.sum(axis=0)
  hosts = np.zeros((n, l, e), dtype=bool)
  for li in range(l):
    hosts[balance_layer(load[li], quota[li]), li, np.arange(e)] = True
  return finish(problem, hosts, "smartmoe", start, dict(quota=quota[0].tolist()))
