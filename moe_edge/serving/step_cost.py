"""Time and cross-server bytes of cluster steps from their actual routing, on the cost model.

The engine's virtual clock and the simulator both cost steps here, from the expert choices of
the tokens each step fed, so the same routing gives the same seconds and bytes in both. The
formulas are :class:`moe_edge.cost.CostModel`'s (its :class:`~moe_edge.core.hardware.Hardware`
methods), applied to many steps at once without building a trace (the simulator costs tens of
thousands of steps)::

  T[s] = dense(B[s], attention[s]) + sum_l ( dispatch[s, l] + max_m compute[s, m, l]
                                             + combine[s, l] )

with ``B[s, n]`` tokens per server, remote token-choices ``C[s, l, n, m]`` (``route[n, l, e]
!= n``), ``compute`` the expert time of the token-choices computed on ``m``
(:meth:`~moe_edge.core.hardware.Hardware.compute_time`: servers without a grouped kernel pay
for their held slots) and, with ``attention=True``, the attention work of every request over its
context (:func:`moe_edge.cost.attention.step_attention_work`: a token at cache position ``p``
attends ``p + 1`` keys). It equals ``CostModel.evaluate(trace, placement, attention=...)
.step_latency`` on the same tokens (a test checks it at 3 and 12 servers). Bytes: dispatch plus
combine, ``2 * act * sum C`` (exact integers; the real dispatch moves exactly this). Expert
compute is counted sparsely (only used experts) and flows densely per chunk of steps, so no
``[N, L, E, N]`` table is built and 256 servers fit.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.problem import Placement
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.attention import step_attention_work
from moe_edge.cost.calibrate import Calibration
from moe_edge.cost.model import CostModel

_FLOW_CHUNK = 1 << 22  # entries of the dense [S_c, L, N, N] flow counts per chunk of steps


@dataclasses.dataclass(frozen=True, eq=False)
class StepCost:
  """Costs steps of ``model`` on ``cluster`` (datasheet calibration unless given).

  ``attention``: price each request's attention over its context (KV reads in decode), as
  ``CostModel.evaluate(attention=True)``; the tokens' requests and positions are then needed.
  """
  model: ModelConfig
  cluster: ClusterConfig
  calibration: Calibration | None = None
  attention: bool = False

  def __post_init__(self):
    object.__setattr__(self, "cost", CostModel.build(self.model, self.cluster,
                                                     self.calibration))

  @classmethod
  def of(cls, cost: CostModel, attention: bool = False) -> "StepCost":
    """The step cost of an existing cost model (its model, cluster and calibration)."""
    out = cls.__new__(cls)
    for f, v in (("model", cost.model), ("cluster", cost.cluster),
                 ("calibration", cost.calibration), ("attention", attention), ("cost", cost)):
      object.__setattr__(out, f, v)
    return out

  def steps(self, placement: Placement, step: np.ndarray, server: np.ndarray,
            expert_ids: np.ndarray, num_steps: int, request: np.ndarray | None = None,
            position: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(seconds [S], remote [S])``: every step's time and remote token-choices (module
    docstring; cross bytes are ``2 * act * remote``).

    Args:
      step, server: ``[T]`` each fed token's step (``0..S-1``) and server.
      expert_ids: ``[T, L, k]`` its experts.
      num_steps: ``S``.
      request, position: ``[T]`` its request and cache position (needed with attention).
    """
    hw, model = self.cost.hardware, self.model
    n, n_lay = self.cluster.num_servers, model.n_moe_layers
    ids = expert_ids
    lay = np.broadcast_to(np.arange(n_lay)[None, :, None], ids.shape)
    src = np.broadcast_to(server[:, None, None], ids.shape)
    stp = np.broadcast_to(step[:, None, None], ids.shape)
    dest = placement.route[src, lay, ids].astype(np.int64)               # [T, L, k]
    remote = dest != src
    n_remote = np.bincount(step, weights=remote.sum(axis=(1, 2)), minlength=num_steps)
    # expert compute: token-choices per (step, computing server, layer, expert)
    key = ((stp * n + dest) * n_lay + lay) * model.n_experts + ids
    uk, count = np.unique(key.ravel(), return_counts=True)
    cell = uk // model.n_experts                                          # (step, m, l)
    m_of = (cell // n_lay) % n
    size = num_steps * n * n_lay
    per = np.bincount(cell, weights=hw.expert_time(count.astype(np.float64), servers=m_of),
                      minlength=size).reshape(num_steps, n, n_lay)
    rows = np.bincount(cell, weights=count, minlength=size).reshape(num_steps, n, n_lay)
    held = placement.hosts.sum(axis=2)[None]                              # [1, N, L]
    compute = hw.compute_time(per, rows, held, server_axis=1).max(axis=1)  # [S, L]
    exchange = self._exchange(step, lay, src, dest, remote, num_steps)
    tokens = np.bincount(step * n + server, minlength=num_steps * n).reshape(num_steps, n)
    if self.attention:
      ab, af = step_attention_work(model, step, server, request, position, num_steps, n)
      dense = hw.dense_time(tokens, ab, af)
    else:
      dense = hw.dense_time(tokens)
    return dense + (compute + exchange).sum(axis=1), n_remote.astype(np.int64)

  def _exchange(self, step, lay, src, dest, remote, num_steps: int) -> np.ndarray:
    """``[S, L]`` dispatch plus combine seconds, flows dense per chunk of steps."""
    n, n_lay = self.cluster.num_servers, self.model.n_moe_layers
    stp = np.broadcast_to(step[:, None, None], lay.shape)
    exchange = np.zeros((num_steps, n_lay))
    flow_key = (((stp * n_lay + lay) * n + src) * n + dest)[remote]
    span = max(1, _FLOW_CHUNK // (n_lay * n * n))
    for s0 in range(0, num_steps, span):
      s1 = min(num_steps, s0 + span)
      lo, hi = s0 * n_lay * n * n, s1 * n_lay * n * n
      sel = flow_key[(flow_key >= lo) & (flow_key < hi)] - lo
      flows = np.bincount(sel, minlength=hi - lo).reshape(s1 - s0, n_lay, n, n).astype(float)
      dispatch, combine = self.cost.hardware.exchange_times(flows)
      exchange[s0:s1] = dispatch + combine
    return exchange

  def step(self, expert_ids: np.ndarray, server: np.ndarray, placement: Placement,
           request: np.ndarray | None = None,
           position: np.ndarray | None = None) -> tuple[float, int]:
    """``(seconds, cross-server bytes)`` of one step feeding ``T`` tokens (0 for none)."""
    t = expert_ids.shape[0]
    if t == 0:
      return 0.0, 0
    seconds, remote = self.steps(placement, np.zeros(t, np.int64), np.asarray(server),
                                 np.asarray(expert_ids), 1, request, position)
    return float(seconds[0]), 2 * self.cost.hardware.act * int(remote[0])

  def trace(self, expert_ids: np.ndarray, server: np.ndarray,
            request: np.ndarray | None = None,
            position: np.ndarray | None = None) -> ActivationTrace:
    """The one-step trace of these tokens (to cost them with ``CostModel.evaluate``)."""
    t = expert_ids.shape[0]
    return ActivationTrace(
        expert_ids=np.asarray(expert_ids, np.int32),
        gate_weights=np.ones(expert_ids.shape, np.float32),
        server=np.asarray(server, np.int32),
        request=np.arange(t, dtype=np.int32) if request is None else np.asarray(request,
                                                                                  np.int32),
        position=np.zeros(t, np.int32) if position is None else np.asarray(position, np.int32),
        step=np.zeros(t, np.int32), model=self.model.name,
        num_experts=self.model.n_experts, num_servers=self.cluster.num_servers,
        source="serving step")
