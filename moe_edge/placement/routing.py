"""Re-export of the route tables' old path (moved to :mod:`moe_edge.core.routing`; this path
keeps working until the final clean-up). ``nearest_replica_route_fast(hosts, model, cluster,
...)`` prices on the datasheet numbers of ``Hardware.build(model, cluster)``; code that has a
problem calls ``route_table(hosts, problem.hardware, ...)``."""
from __future__ import annotations

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.hardware import Hardware
from moe_edge.core.routing import route_table, route_table_reference


def nearest_replica_route_fast(hosts: np.ndarray, model: ModelConfig, cluster: ClusterConfig,
                               traffic: np.ndarray | None = None,
                               slack: float = 0.1) -> np.ndarray:
  """:func:`moe_edge.core.routing.route_table` on the datasheet hardware."""
  return route_table(hosts, Hardware.build(model, cluster), traffic, slack)


__all__ = ["nearest_replica_route_fast", "route_table", "route_table_reference"]
