"""Time and cross-server bytes of one cluster step from its actual routing, on the cost model.

The engine's virtual clock and the simulator both cost a step here, from the expert choices of
the tokens the step fed (``expert_ids [T, L, k]``, ``server [T]``), so the same routing gives
the same seconds and bytes in both. The formulas are :class:`moe_edge.cost.CostModel`'s (its
:class:`~moe_edge.core.hardware.Hardware` methods), applied to one step without building a
trace (the simulator costs tens of thousands of steps)::

  T = dense(B) + sum_l ( dispatch[l] + max_m sum_e expert_time(c[m, l, e]) + combine[l] )

with ``B[n]`` tokens per server, ``C[l, n, m]`` remote token-choices and ``c[m, l, e]``
token-choices computed on ``m``; it equals ``CostModel.evaluate`` on the one-step trace (a test
checks it). Bytes: dispatch plus combine, ``2 * act * sum C`` (exact integers; the real dispatch
moves exactly this).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.problem import Placement
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.calibrate import Calibration
from moe_edge.cost.model import CostModel


@dataclasses.dataclass(frozen=True, eq=False)
class StepCost:
  """Costs steps of ``model`` on ``cluster`` (datasheet calibration unless given)."""
  model: ModelConfig
  cluster: ClusterConfig
  calibration: Calibration | None = None

  def __post_init__(self):
    object.__setattr__(self, "cost", CostModel.build(self.model, self.cluster,
                                                     self.calibration))

  def step(self, expert_ids: np.ndarray, server: np.ndarray,
           placement: Placement) -> tuple[float, int]:
    """``(seconds, cross-server bytes)`` of a step feeding ``T`` tokens (0 for none)."""
    t = expert_ids.shape[0]
    if t == 0:
      return 0.0, 0
    hw = self.cost.hardware
    n_srv, n_lay, n_exp = placement.route.shape
    flat = self._route(placement)                                              # [N * L * E]
    ids = expert_ids.reshape(t, -1).astype(np.int64)                           # [T, L * k]
    k = ids.shape[1] // n_lay
    lay = np.repeat(np.arange(n_lay, dtype=np.int64), k)[None, :]              # [1, L * k]
    src = server.astype(np.int64)[:, None]
    dest = flat[(src * n_lay + lay) * n_exp + ids]                             # [T, L * k]
    flows = np.bincount(((lay * n_srv + src) * n_srv + dest).ravel(),
                        minlength=n_lay * n_srv * n_srv).reshape(n_lay, n_srv, n_srv)
    flows[:, self._diag(n_srv), self._diag(n_srv)] = 0                         # local
    dispatch, combine = hw.exchange_times(flows.astype(np.float64))
    c = np.bincount(((dest * n_lay + lay) * n_exp + ids).ravel(),
                    minlength=n_srv * n_lay * n_exp).reshape(n_srv, n_lay, n_exp)
    c = c.astype(np.float64)
    compute = hw.compute_time(hw.expert_time(c, server_axis=0).sum(axis=2), c.sum(axis=2),
                              placement.hosts.sum(axis=2), server_axis=0).max(axis=0)
    tokens = np.bincount(server, minlength=n_srv).astype(np.float64)
    seconds = float(hw.dense_time(tokens) + (dispatch + compute + combine).sum())
    return seconds, 2 * hw.act * int(flows.sum())

  def _route(self, placement: Placement) -> np.ndarray:
    """The placement's route table flattened to int64 (cached for the last placement)."""
    cached = getattr(self, "_route_cache", None)
    if cached is None or cached[0] is not placement:
      cached = (placement, placement.route.astype(np.int64).ravel())
      object.__setattr__(self, "_route_cache", cached)
    return cached[1]

  @staticmethod
  def _diag(n: int) -> np.ndarray:
    return np.arange(n)

  def seconds(self, expert_ids: np.ndarray, server: np.ndarray, placement: Placement) -> float:
    return self.step(expert_ids, server, placement)[0]

  def cross_bytes(self, expert_ids: np.ndarray, server: np.ndarray,
                  placement: Placement) -> int:
    return self.step(expert_ids, server, placement)[1]

  def trace(self, expert_ids: np.ndarray, server: np.ndarray) -> ActivationTrace:
    """The one-step trace of these tokens (to cost them with ``CostModel.evaluate``)."""
    t = expert_ids.shape[0]
    return ActivationTrace(
        expert_ids=np.asarray(expert_ids, np.int32),
        gate_weights=np.ones(expert_ids.shape, np.float32),
        server=np.asarray(server, np.int32), request=np.arange(t, dtype=np.int32),
        position=np.zeros(t, np.int32), step=np.zeros(t, np.int32), model=self.model.name,
        num_experts=self.model.n_experts, num_servers=self.cluster.num_servers,
        source="serving step")
