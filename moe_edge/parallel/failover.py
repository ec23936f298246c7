"""Failure handling of the serving runtime: the immediate fallback when a server is lost.

:meth:`moe_edge.parallel.runtime.ServingRuntime.fail_server` follows
:func:`moe_edge.migration.failure.fail_server`: at once the route tables switch to the surviving
replicas (:func:`fallback_placement`, no data moves); experts the failed server held alone are
*unreachable* until they are re-loaded from the checkpointed weights onto surviving servers with
room (the planner's recovery placement, applied like any migration).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.routing import route_table
from moe_edge.migration.failure import FailureReport
from moe_edge.parallel.weights import MigrationReport


@dataclasses.dataclass(frozen=True)
class FailoverResult:
  """A failure drill. ``unreachable``: experts no token could reach until re-loaded (empty when
  every expert of the failed server had a replica); ``report``: the planner's account
  (:class:`moe_edge.migration.failure.FailureReport`: rerouted share, reloads, evictions,
  estimated recovery time); ``reload``: what the runtime moved to recover (None if not yet)."""
  server: int
  unreachable: tuple[tuple[int, int], ...]
  report: FailureReport
  reload: MigrationReport | None


def fallback_placement(current: Placement, slot_expert: np.ndarray, server: int,
                       after: PlacementProblem) -> Placement:
  """The interim placement right after ``server`` fails: survivors' replicas take the tokens
  (route table on ``after.hardware`` and ``after.traffic``, ``after`` = the problem without the
  server); experts only it held (orphans) stay "on" it, unreachable until re-loaded, so the
  tables stay a valid placement. ``slot_expert [N, L, S]`` is the runtime's slot table; the
  failed server's slots keep only the orphans (no weights move)."""
  hosts = current.hosts.copy()
  hosts[server] = False
  orphan = ~hosts.any(axis=0)
  hosts[server] = orphan
  route = route_table(hosts, after.hardware, after.traffic)
  slot = slot_expert.copy()
  mine = slot[server]  # [L, S] view
  held = mine >= 0
  mine[held] = np.where(orphan[np.nonzero(held)[0], mine[held]], mine[held], -1)
  interim = Placement(hosts, route, slot, f"{current.method}-fallback",
                      dict(failed_server=server))
  interim.validate()
  return interim
