"""Prism (DanceMoE v1): the expert placement of "Accelerating Edge Inference for Distributed MoE
Models with Latency-Optimized Expert Placement" (arXiv 2508.12851), as its summary publishes it
(``docs/PAPER.md``; the full text is not available to us).

The paper minimises the expected number of remote expert calls
``sum_n sum_l sum_e F[n, l, e] * remote(n, l, e)`` subject to every expert being hosted at least
once and each server's memory. Notation: traffic ``T[n, l, e] = tokens[n] * F[n, l, e]``
(``PlacementProblem.traffic``), capacity ``C[n]`` experts per server, ``E`` experts per layer.

1. **Entropy split.** Server n's capacity is split over layers in proportion to the entropy
   ``H[n, l] = -sum_e p log p`` of its activation distribution ``p = F[n, l, :] / sum_e F``
   (a flat layer needs more local experts than a skewed one): real shares
   ``s[n, l] = C'[n] H[n, l] / sum_l H[n, l]`` with ``C'[n] = min(C[n], L E)``, rounded to
   integer budgets ``b[n, l]`` by largest remainder (``sum_l b[n, l] = C'[n]``, ``b <= E``).
2. **Shortfall repair.** Rounding (and skew) can leave a layer with ``sum_n b[n, l] < E``, too few
   slots to hold each of its experts once. Budget is moved into each short layer, one slot at a
   time, from the same server's layer with the largest surplus (``sum_n b[n, l'] - E``, ties to
   the lower layer), taking servers in decreasing capacity (the paper "favours high-capacity
   servers"); a server gives only from a layer where it has budget and takes only where it has
   fewer than ``E``. Total memory ``sum_n C[n] >= L E`` makes this always succeed.
3. **Greedy.** Each server takes, in each layer, its ``b[n, l]`` most activated experts (largest
   ``F[n, l, e]``; ties to the lower expert id). The local utility is a sum of per-copy
   activations, so this greedy maximises it exactly per (server, layer); the paper states the
   ``1 - 1/e`` guarantee of the general submodular case.
4. **Repair pass.** In each layer, experts no server holds, most useful first (largest total
   traffic ``sum_n T[n, l, e]``; ties to the lower id), each replace one *duplicate* (a copy whose
   expert has another copy in the layer): the server n and duplicate d maximising
   ``T[n, l, u] - T[n, l, d]`` (n's least-used duplicate, on the server where the swap costs the
   least local utility; ties to the lower server id). Step 2 guarantees a duplicate exists.
5. **Routing** to the nearest replica: ``problem.nearest_replica_route`` (local if held, else
   the replica with the least link plus compute time per token, ties within ``route_slack`` to
   the least loaded).

Choices the summary leaves open, and ours: the entropy's mapping to shares (proportional to
``H``, in nats; a layer without traffic counts as uniform, ``H = log E``; a server whose every
layer has zero entropy splits evenly); rounding (largest remainder, ties to the lower layer);
the order in which shortfalls are repaired (layers in increasing id, servers by capacity then
id) and which layer gives (largest surplus); the greedy's tie-breaking; the repair pass's choice
of server (least utility lost) and its order (most traffic first); the routing's load spreading
(the project's default route, ``route_slack``). Memory beyond ``L E`` experts on one server is
left unused (a server holding every expert has nothing else to hold).
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
class PrismOptions:
  """Options of :func:`prism`.

  Attributes:
    route_slack: the nearest-replica route's tie slack (relative).
  """
  route_slack: float = 0.1

  def __post_init__(self):
    if not self.route_slack >= 0:
      raise PlacementError(f"prism: route_slack={self.route_slack} must be >= 0.")


def layer_entropy(freq: np.ndarray) -> np.ndarray:
  """``[N, L]`` entropy (nats) of each server's per-layer activation distribution.

  Args:
    freq: ``[N, L, E]`` activation frequencies; a row without traffic counts as uniform.
  """
  e = freq.shape[2]
  tot = freq.sum(axis=2, keepdims=True)
  p = np.where(tot > 0, freq / np.where(tot > 0, tot, 1.0), 1.0 / e)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=2)


def entropy_budgets(freq: np.ndarray, capacity: np.ndarray) -> np.ndarray:
  """``[N, L]`` int budgets: steps 1 and 2 of the module docstring.

  Every layer's budgets sum to at least ``E``, every server's to ``min(capacity, L E)``, and
  ``0 <= b <= E``.
  """
  n, l, e = freq.shape
  cap = np.minimum(np.asarray(capacity, dtype=np.int64), l * e)
  if cap.sum() < l * e:
    raise PlacementError(f"prism: the servers hold {int(cap.sum())} experts but the model has "
                         f"{l * e}; add memory or servers.")
  h = layer_entropy(freq)
  tot = h.sum(axis=1, keepdims=True)
  weight = np.where(tot > 0, h / np.where(tot > 0, tot, 1.0), 1.0 / l)
  budget = _largest_remainder(weight, cap, e)
  # Step 2: move budget into short layers, high-capacity servers first.
  servers = np.lexsort((np.arange(n), -cap))
  for li in range(l):
    while budget[:, li].sum() < e:
      surplus = budget.sum(axis=0) - e
      for s in servers:
        give = np.flatnonzero((budget[s] > 0) & (surplus > 0))
        if budget[s, li] < e and give.size:
          src = give[np.argmax(surplus[give])]
          budget[s, src] -= 1
          budget[s, li] += 1
          break
      else:  # unreachable while sum(cap) >= L E; kept as a guard against an endless loop
        raise PlacementError(f"prism: layer {li} cannot get {e} slots from the other layers.")
  return budget


def _largest_remainder(weight: np.ndarray, total: np.ndarray, cap: int) -> np.ndarray:
  """``[N, L]`` integers in ``[0, cap]`` summing to ``total [N]`` per row, proportional to
  ``weight [N, L]`` (rows summing to 1): real shares ``clip(a[n] * weight, 0, cap)`` with the
  scale ``a[n]`` found by bisection so that a row sums to ``total[n]``, floored, then +1 to the
  largest remainders (ties to the lower layer)."""
  n, l = weight.shape
  lo, hi = np.zeros(n), np.full(n, float(cap) * l / max(float(weight[weight > 0].min(
      initial=1.0)), 1e-12) + 1.0)
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    over = np.clip(mid[:, None] * weight, 0, cap).sum(axis=1) > total
    lo, hi = np.where(over, lo, mid), np.where(over, mid, hi)
  share = np.clip(lo[:, None] * weight, 0, cap)
  budget = np.minimum(np.floor(share + 1e-9).astype(np.int64), cap)
  left = total - budget.sum(axis=1)
  frac = np.where(budget < cap, share - budget, -np.inf)
  order = np.argsort(-frac, axis=1, kind="stable")
  bump = np.arange(l)[None, :] < left[:, None]
  np.put_along_axis(budget, order, np.take_along_axis(budget, order, axis=1) + bump, axis=1)
  return budget


def greedy_hosts(freq: np.ndarray, budget: np.ndarray) -> np.ndarray:
  """``[N, L, E]`` bool: each server's ``budget[n, l]`` most activated experts per layer."""
  n, l, e = freq.shape
  rank = np.argsort(np.argsort(-freq, axis=2, kind="stable"), axis=2, kind="stable")
  return rank < budget[:, :, None]


def repair(hosts: np.ndarray, traffic: np.ndarray) -> tuple[np.ndarray, int]:
  """Step 4: swap duplicates for experts no server holds; returns ``(hosts, swaps)``."""
  hosts = hosts.copy()
  n, l, e = hosts.shape
  swaps = 0
  for li in range(l):
    count = hosts[:, li].sum(axis=0)
    missing = np.flatnonzero(count == 0)
    missing = missing[np.argsort(-traffic[:, li, missing].sum(axis=0), kind="stable")]
    for u in missing:
      dup = hosts[:, li] & (count >= 2)[None, :]
      if not dup.any():
        raise PlacementError(f"prism: layer {li} has no duplicate left for expert {u}; the "
                             f"layer budgets hold fewer than E experts.")
      loss = np.where(dup, traffic[:, li], np.inf)
      d = np.argmin(loss, axis=1)                                   # least-used duplicate
      score = traffic[:, li, u] - loss[np.arange(n), d]
      s = int(np.argmax(np.where(np.isfinite(score), score, -np.inf)))
      hosts[s, li, d[s]] = False
      hosts[s, li, u] = True
      count[d[s]] -= 1
      count[u] = 1
      swaps += 1
  return hosts, swaps


@register("prism", "paper", PrismOptions, label="Prism")
def prism(problem: PlacementProblem, options: PrismOptions = PrismOptions(),
          context: PlacementContext = PlacementContext()) -> Placement:
  """The paper's placement (module docstring). Deterministic; ``context`` is unused."""
  start = time.perf_counter()
  budget = entropy_budgets(problem.freq, problem.capacity)
  hosts = greedy_hosts(problem.freq, budget)
  hosts, swaps = repair(hosts, problem.traffic)
  info = dict(budget_mean_per_layer=budget.mean(axis=0).round(2).tolist(), repair_swaps=swaps)
  return finish(problem, hosts, "prism", start, info, slack=options.route_slack)
