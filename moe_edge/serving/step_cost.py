"""Time and cross-server bytes of one cluster step from its actual routing, on the cost model.

The engine's virtual clock and the simulator both cost a step here, from the expert choices of
the tokens the step fed (``expert_ids [T, L, k]``, ``server [T]``), so the same routing gives
the same seconds and bytes in both. Time: :func:`moe_edge.cost.model.evaluate` on a one-step
trace (``T[s] = dense + sum_l (dispatch + compute + combine)``); bytes: dispatch plus combine,
``2 * bytes_matrix(...).sum()``, exact integers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.cost.calibrate import Calibration
from moe_edge.cost.model import bytes_matrix, evaluate
from moe_edge.placement.problem import Placement
from moe_edge.workload.traces import ActivationTrace


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Costs steps of ``model`` on ``cluster`` (datasheet calibration unless given)."""
  model: ModelConfig
  cluster: ClusterConfig
  calibration: Calibration | None = None

  def trace(self, expert_ids: np.ndarray, server: np.ndarray) -> ActivationTrace:
    """A one-step trace of ``T`` tokens (``expert_ids [T, L, k]``, ``server [T]``)."""
    t = expert_ids.shape[0]
    return ActivationTrace(
        expert_ids=np.asarray(expert_ids, np.int32),
        gate_weights=np.ones(expert_ids.shape, np.float32),
        server=np.asarray(server, np.int32), request=np.arange(t, dtype=np.int32),
        position=np.zeros(t, np.int32), step=np.zeros(t, np.int32), model=self.model.name,
        num_experts=self.model.n_experts, num_servers=self.cluster.num_servers,
        source="serving step")

  def cross_bytes(self, expert_ids: np.ndarray, server: np.ndarray,
                  placement: Placement) -> int:
    """Dispatch plus combine bytes between servers of the step (0 for an empty step)."""
    if expert_ids.shape[0] == 0:
      return 0
    tr = self.trace(expert_ids, server)
    return 2 * int(bytes_matrix(tr, placement, self.model.activation_bytes).sum())

  def seconds(self, expert_ids: np.ndarray, server: np.ndarray, placement: Placement) -> float:
    """Modelled step latency (0 for an empty step)."""
    if expert_ids.shape[0] == 0:
      return 0.0
    rep = evaluate(self.trace(expert_ids, server), self.model, self.cluster, placement,
                   "decode", self.calibration)
    return float(rep.step_latency[0])
