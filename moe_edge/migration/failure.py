r"""Failure drill: lose a server, reroute at once, re-load what it held alone from storage.

**Failure** (:func:`fail_server`). A failed server's tokens stop and its replicas vanish. Tokens
of experts held elsewhere fall back at once to the remaining replicas (route recomputed without
it); experts it held alone are unreachable until re-loaded from checkpointed weights (storage,
not links) onto surviving servers with room (evicting low-value replicas that are not last
copies if needed). Recovery time = the slowest server's ``loads * W_e / storage_bandwidth``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from moe_edge.migration.incremental import replica_values
from moe_edge.migration.slots import MigrationError, placement_with_slots
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.routing import route_table

DEFAULT_STORAGE_BANDWIDTH = 2e9  # bytes/s: an NVMe SSD read (documented assumption; override)


@dataclasses.dataclass(frozen=True)
class FailureReport:
  """What losing a server costs.

  Attributes:
    server: the failed server.
    lost_replicas: replicas it held.
    orphans: ``[(layer, expert)]`` experts it held alone: unreachable until re-loaded.
    rerouted_share: share of the surviving servers' token-choices whose destination changed
      (they now go to another replica at once).
    reloads: ``[(server, layer, expert)]`` where the orphans were re-loaded from storage.
    evicted: ``[(server, layer, expert)]`` replicas dropped to make room for them.
    storage_bytes: bytes read from checkpoint storage (not over links).
    recovery_s: seconds until every expert is reachable again (slowest server's loads).
  """
  server: int
  lost_replicas: int
  orphans: tuple[tuple[int, int], ...]
  rerouted_share: float
  reloads: tuple[tuple[int, int, int], ...]
  evicted: tuple[tuple[int, int, int], ...]
  storage_bytes: float
  recovery_s: float

  @property
  def unreachable_during_recovery(self) -> tuple[tuple[int, int], ...]:
    """Experts no token can reach until recovery ends (the orphans)."""
    return self.orphans


def failed_problem(problem: PlacementProblem, server: int) -> PlacementProblem:
  """``problem`` without ``server``: no tokens and no room there."""
  tokens, cap = problem.tokens.copy(), problem.capacity.copy()
  tokens[server], cap[server] = 0.0, 0
  return PlacementProblem(problem.model, problem.cluster, problem.freq, tokens, cap,
                          problem.hardware)


def fail_server(placement: Placement, server: int, problem: PlacementProblem,
                storage_bandwidth: float | Sequence[float] = DEFAULT_STORAGE_BANDWIDTH
                ) -> tuple[Placement, FailureReport]:
  """Lose ``server``: reroute at once, re-load the experts it held alone (module docstring).

  Args:
    placement: the placement in use (valid for ``problem``).
    server: the failed server's index.
    problem: statistics and capacities before the failure.
    storage_bandwidth: bytes/s a server reads checkpointed weights at (one value or ``[N]``).
  Returns:
    ``(placement after recovery, report)``. The new placement holds nothing on ``server`` and is
    valid for :func:`failed_problem`; kept experts keep their slots.
  """
  placement.validate(problem)
  n_srv, n_lay, n_exp = problem.shape
  if not 0 <= server < n_srv:
    raise MigrationError(f"server {server} does not exist; the cluster has servers 0..{n_srv - 1}.")
  if n_srv < 2:
    raise MigrationError("a one-server cluster cannot survive losing its server.")
  sbw = np.broadcast_to(np.asarray(storage_bandwidth, dtype=np.float64), (n_srv,))
  if np.any(~(sbw > 0)):
    raise MigrationError(f"storage_bandwidth must be > 0 bytes/s, got {storage_bandwidth}.")
  room = int(problem.capacity.sum() - problem.capacity[server])
  if room < n_lay * n_exp:
    short = (n_lay * n_exp - room) * problem.model.expert_bytes
    raise MigrationError(f"the surviving servers hold {room} experts but the model has "
                         f"{n_lay * n_exp}; losing server {server} cannot be survived without "
                         f"{short:,.0f} more bytes of expert memory.")
  after = failed_problem(problem, server)
  model = problem.model
  traffic = after.traffic
  hosts = placement.hosts.copy()
  lost = int(hosts[server].sum())
  hosts[server] = False
  orphan_mask = ~hosts.any(axis=0)
  orphans = [tuple(int(x) for x in o) for o in np.argwhere(orphan_mask)]

  # Immediate fallback: every expert still held somewhere is routed to a surviving replica;
  # orphans keep pointing at the dead server (unreachable) until they are re-loaded.
  live = np.ones(n_srv, bool)
  live[server] = False
  interim = hosts.copy()
  interim[server] = orphan_mask
  immediate = route_table(interim, after.hardware, traffic)
  survivors = traffic[live].sum()
  changed = (immediate != placement.route)[live] & ~orphan_mask[None]
  rerouted = float((traffic[live] * changed).sum() / survivors) if survivors > 0 else 0.0

  # Re-load orphans, hottest first, onto the surviving server that wants them most.
  link = after.hardware.link_time_per_token()
  np.fill_diagonal(link, 0.0)
  loads = np.zeros(n_srv, dtype=np.int64)
  reloads, evicted = [], []
  demand = traffic.sum(axis=0)
  for l, e in sorted(orphans, key=lambda o: -demand[o]):
    room = after.capacity - hosts.sum(axis=(1, 2))
    _, drop = replica_values(hosts, traffic, link)
    drop[~hosts] = np.inf
    drop[server] = np.inf
    # Value of hosting (l, e) on m: its local traffic, minus what an eviction would lose.
    evict_loss = np.where(room > 0, 0.0, drop.reshape(n_srv, -1).min(axis=1))
    value = traffic[:, l, e] - evict_loss
    value = np.where(live & np.isfinite(evict_loss), value, -np.inf)
    # Ties (e.g. no local demand anywhere) go to the server with the fewest loads queued.
    m = int(np.lexsort((loads / sbw, -value))[0])
    if not np.isfinite(value[m]):
      raise MigrationError(f"no surviving server can take expert {e} of layer {l}: every "
                           f"replica is a last copy and memory is full.")
    if room[m] <= 0:
      v = np.unravel_index(int(drop[m].argmin()), (n_lay, n_exp))
      hosts[m, v[0], v[1]] = False
      evicted.append((m, int(v[0]), int(v[1])))
    hosts[m, l, e] = True
    loads[m] += 1
    reloads.append((m, l, e))
  recovery = float(np.max(loads * model.expert_bytes / sbw)) if reloads else 0.0
  new = placement_with_slots(hosts, placement, after.hardware, traffic,
                             method=f"{placement.method}-failover",
                             info=dict(failed_server=server))
  new.validate(after)
  report = FailureReport(server=server, lost_replicas=lost, orphans=tuple(orphans),
                         rerouted_share=rerouted, reloads=tuple(reloads), evicted=tuple(evicted),
                         storage_bytes=float(len(reloads) * model.expert_bytes),
                         recovery_s=recovery)
  return new, report
