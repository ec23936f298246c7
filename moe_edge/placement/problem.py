"""Re-export of the placement problem's old path: the types moved to :mod:`moe_edge.core.problem`
and the route tables to :mod:`moe_edge.core.routing` (docs/DESIGN.md, "Layout"). This path keeps
working until the final clean-up; new code imports from ``moe_edge.core``.

``link_time_per_token(model, cluster)`` and ``nearest_replica_route(hosts, model, cluster, ...)``
price on the datasheet numbers of ``Hardware.build(model, cluster)``; code that has a problem
uses ``problem.hardware`` instead (calibrated when the problem was built with a calibration).
"""
from __future__ import annotations

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem, check_slot_table, slot_table
from moe_edge.core.routing import route_table_reference


def link_time_per_token(model: ModelConfig, cluster: ClusterConfig) -> np.ndarray:
  """``[N, N]``: ``Hardware.build(model, cluster).link_time_per_token()`` (datasheet)."""
  return Hardware.build(model, cluster).link_time_per_token()


def nearest_replica_route(hosts: np.ndarray, model: ModelConfig, cluster: ClusterConfig,
                          traffic: np.ndarray | None = None, slack: float = 0.1) -> np.ndarray:
  """:func:`moe_edge.core.routing.route_table_reference` on the datasheet hardware."""
  return route_table_reference(hosts, Hardware.build(model, cluster), traffic, slack)


__all__ = ["Placement", "PlacementError", "PlacementProblem", "check_slot_table",
           "link_time_per_token", "nearest_replica_route", "slot_table"]
