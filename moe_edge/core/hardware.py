"""Hardware: every per-server and per-link number the cost formulas use, and the formulas.

One :class:`Hardware` is built from ``(model, cluster, calibration)``; every time that moe-edge
computes (the cost model's ``evaluate`` and ``expected``, the latency refinement, the placement
objective, the route tables, budgeted expert selection, the migration schedule and the runtime's
choice of copy source) calls one of its methods, so a formula is changed in one place
(docs/DESIGN.md, "Cost"). Notation as in :mod:`moe_edge.cost.model`: servers ``n, m``;
``W_e = expert_bytes``, ``F_e = expert_flops_per_token``, ``W_d = dense_bytes``,
``F_d = dense_flops_per_token``, ``a = activation_bytes``; calibrated rates
``peak[m] eta_f[m]`` (FLOP/s) and ``mbw[m] eta_b[m]`` (bytes/s).

Formulas (all seconds):

* expert time of ``c`` token-choices on ``m``: ``max(W_e / (mbw eta_b), c F_e / (peak eta_f))``
  for a used expert (``c > 0``), 0 otherwise; on expected counts the weight read is charged
  with the Poisson probability ``1 - exp(-E[c])`` that the expert is used at all (a grouped
  expert FFN; a server's time at a layer is the sum over its experts);
* expert time of a server without a grouped kernel (``ServerSpec.grouped_kernel=False``; XLA's
  ``ragged_dot`` as measured on the H200, results/bench_ffn: dense over the ``G`` slots it
  holds in the layer, every slot's weights read, every one of its ``R`` rows multiplied through
  every slot): ``max(G W_e / (mbw eta_b), R G F_e / (peak eta_f))`` when ``R > 0``, 0
  otherwise; on expected counts the read is charged with probability ``1 - exp(-E[R])``
  (:meth:`Hardware.compute_time`);
* exchange of ``C[n, m]`` remote token-choices (links in parallel, a server's sends serialised
  on its NIC; a link's latency once when it carries anything, weight ``used``)::

    dispatch = max_n ( max_m used[n, m] lat[n, m] + sum_m a C[n, m] / bw[n, m] )
    combine  = max_m ( max_n used[n, m] lat[m, n] + sum_n a C[n, m] / bw[m, n] )

* dense time of ``B[n]`` tokens: ``max_{n : B[n] > 0} max(W_d / (mbw eta_b), B[n] F_d /
  (peak eta_f))``; with the attention work of the step's requests (``A_bytes[n]`` KV-cache
  bytes, ``A_flops[n]`` score FLOPs, ``moe_edge/cost/attention.py``) folded into the same
  roofline: ``max((W_d + A_bytes) / (mbw eta_b), (B F_d + A_flops) / (peak eta_f))``;
* link time per token ``2 (lat[n, m] + a / bw[n, m])`` (activations there and the result back);
  the route cost of sending a token-choice from ``n`` to ``m`` adds ``m``'s compute per token;
* copy time of ``bytes`` over ``n -> m``: ``lat[n, m] + bytes / bw[n, m]``; a round of copies
  lasts as long as its busiest NIC (sends or receives serialised, latency once per used link).

This module lives in ``core`` (not ``cost``) because the route table of every
:class:`~moe_edge.core.problem.Placement` is built from it; ``moe_edge.cost.hardware`` is its
public path next to the cost model.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, model_config
from moe_edge.core.errors import MoeEdgeError


class HardwareError(MoeEdgeError):
  """Hardware numbers that do not fit together (calibration of another cluster, bad bytes)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Hardware:
  """Calibrated per-server roofline coefficients and links of one model on one cluster.

  Attributes:
    flops: ``[N]`` effective FLOP/s, ``peak eta_f``.
    expert_read: ``[N]`` seconds to read one expert's weights, ``W_e / (mbw eta_b)``.
    expert_flop: ``[N]`` seconds of one token's expert compute, ``F_e / (peak eta_f)``.
    dense_read: ``[N]`` seconds to read the dense weights, ``W_d / (mbw eta_b)``.
    dense_flop: ``[N]`` seconds of one token's dense compute, ``F_d / (peak eta_f)``.
    bw: ``[N, N]`` link bytes/s (diagonal +inf).
    inv_bw: ``[N, N]`` seconds per byte (diagonal 0).
    lat: ``[N, N]`` seconds per message (diagonal 0).
    act: bytes of one token-choice's activations on the wire.
    expert_bytes: bytes of one routed expert's weights (what a migration copy moves).
    source: where the efficiency factors came from (``"datasheet"`` when none were given).
    grouped: ``[N]`` bool, ``ServerSpec.grouped_kernel`` of each server (None: all True).
    mem_bw: ``[N]`` effective memory bytes/s, ``mbw eta_b`` (what KV-cache reads stream at).
  """
  flops: np.ndarray
  expert_read: np.ndarray
  expert_flop: np.ndarray
  dense_read: np.ndarray
  dense_flop: np.ndarray
  bw: np.ndarray
  inv_bw: np.ndarray
  lat: np.ndarray
  act: int
  expert_bytes: float
  source: str = "datasheet"
  grouped: np.ndarray | None = None
  mem_bw: np.ndarray | None = None

  @classmethod
  def build(cls, model: ModelConfig | str, cluster: ClusterConfig, calibration=None,
            activation_bytes: int | None = None) -> "Hardware":
    """Hardware of ``model`` on ``cluster``.

    Args:
      calibration: a :class:`moe_edge.cost.Calibration` (its ``flops_efficiency [N]`` and
        ``bw_efficiency [N]`` scale the datasheet rates) or None for the datasheet (factors 1).
      activation_bytes: bytes per token-choice on the wire (default ``model.activation_bytes``).
    """
    model = model_config(model)
    n = cluster.num_servers
    eta_f, eta_b, source = np.ones(n), np.ones(n), "datasheet"
    if calibration is not None:
      calibration.check(cluster)
      eta_f, eta_b = calibration.flops_efficiency, calibration.bw_efficiency
      source = calibration.source
    flops = cluster.peak_flops * eta_f
    mbw = cluster.mem_bandwidth * eta_b
    bw = np.array(cluster.bandwidth_matrix, dtype=np.float64)
    inv_bw = 1.0 / bw
    np.fill_diagonal(inv_bw, 0.0)
    lat = np.array(cluster.latency_matrix, dtype=np.float64)
    np.fill_diagonal(lat, 0.0)
    return cls(flops, model.expert_bytes / mbw, model.expert_flops_per_token / flops,
               model.dense_bytes / mbw, model.dense_flops_per_token / flops, bw, inv_bw, lat,
               _activation_bytes(model, activation_bytes), float(model.expert_bytes), source,
               np.array([s.grouped_kernel for s in cluster.servers], dtype=bool),
               mbw)

  def time_scaled(self, factor: float) -> "Hardware":
    """This hardware with every modelled time ``factor`` times as long: FLOP/s, memory and link
    bandwidths divided by ``factor``, per-message latencies and per-unit seconds multiplied.
    Every formula here is a sum or max of such seconds, so each step, transfer and copy takes
    exactly ``factor`` times as long (``factor`` > 0 and finite, else :class:`HardwareError`).
    A one-number calibration of an unmeasured testbed (``moe_edge/experiments/paper_calibrated.py``)."""
    f = float(factor)
    if not (np.isfinite(f) and f > 0):
      raise HardwareError(f"time scale must be a positive finite number, got {factor!r}.")
    return dataclasses.replace(
        self, flops=self.flops / f, expert_read=self.expert_read * f,
        expert_flop=self.expert_flop * f, dense_read=self.dense_read * f,
        dense_flop=self.dense_flop * f, bw=self.bw / f, inv_bw=self.inv_bw * f,
        lat=self.lat * f, mem_bw=None if self.mem_bw is None else self.mem_bw / f,
        source=f"{self.source} x{f:.4g} time")

  @property
  def num_servers(self) -> int:
    return int(self.expert_read.shape[0])

  # ---- compute -----------------------------------------------------------------------------
  def expert_time(self, count: np.ndarray, server_axis: int = -1, expected: bool = False,
                  servers: np.ndarray | None = None) -> np.ndarray:
    """Roofline seconds of each expert given its token-choices ``count`` (any shape).

    The computing server of each entry is its index along ``server_axis``, or ``servers`` (an
    array of server ids of ``count``'s shape) when given. ``expected``: ``count`` is an
    expectation and the weight read is charged with probability ``1 - exp(-count)``;
    otherwise a used expert (``count > 0``) reads its weights once and an unused one costs 0.
    """
    if servers is not None:
      read, flop = self.expert_read[servers], count * self.expert_flop[servers]
    else:
      shape = [1] * np.ndim(count)
      shape[server_axis] = -1
      read = self.expert_read.reshape(shape)
      flop = count * self.expert_flop.reshape(shape)
    if expected:
      return np.maximum(read * -np.expm1(-count), flop)
    return np.where(count > 0, np.maximum(read, flop), 0.0)

  def compute_time(self, per_used: np.ndarray, rows: np.ndarray, held: np.ndarray,
                   server_axis: int = -1, expected: bool = False) -> np.ndarray:
    """Expert compute seconds of each server at a layer (any shape, one server per index along
    ``server_axis``; the three arguments broadcast together).

    Args:
      per_used: the sum of :meth:`expert_time` over the server's experts at the layer: the time
        of a grouped kernel, kept for servers with ``grouped_kernel``.
      rows: token-choices the server computes at the layer (``E[R]`` when ``expected``).
      held: expert slots ``G`` the server holds in the layer.
      expected: counts are expectations (the read is charged with ``1 - exp(-rows)``).
    Returns:
      ``per_used`` where the server has a grouped kernel, else the dense-over-slots cost
      ``max(G W_e / (mbw eta_b), R G F_e / (peak eta_f))`` (0 without rows), module docstring.
    """
    if self.grouped is None or self.grouped.all():
      return per_used
    shape = [1] * np.ndim(per_used)
    shape[server_axis] = -1
    read = held * self.expert_read.reshape(shape)
    flop = rows * held * self.expert_flop.reshape(shape)
    if expected:
      dense = np.maximum(read * -np.expm1(-rows), flop)
    else:
      dense = np.where(rows > 0, np.maximum(read, flop), 0.0)
    return np.where(self.grouped.reshape(shape), per_used, dense)

  def dense_time(self, tokens: np.ndarray, attn_bytes: np.ndarray | None = None,
                 attn_flops: np.ndarray | None = None) -> np.ndarray:
    """``[...]`` seconds of the dense part from ``tokens [..., N]`` (servers without tokens skip
    it), with the attention work ``attn_bytes``/``attn_flops [..., N]`` of the step's requests
    in the same roofline when given (module docstring)."""
    if attn_bytes is None:
      t = np.maximum(self.dense_read, tokens * self.dense_flop)
    else:
      t = np.maximum(self.dense_read + attn_bytes / self.mem_bw,
                     tokens * self.dense_flop + attn_flops / self.flops)
    return np.max(np.where(tokens > 0, t, 0.0), axis=-1)

  def compute_time_per_token(self) -> np.ndarray:
    """``[N]`` seconds of one routed expert's compute for one token (the FLOP term)."""
    return self.expert_flop

  # ---- links -------------------------------------------------------------------------------
  def exchange_times(self, flows: np.ndarray,
                     used: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch and combine seconds ``([...], [...])`` of ``flows [..., N, M]`` remote
    token-choices ``n -> m`` (the combine sends the results back ``m -> n``).

    ``used [..., N, M]`` weighs each link's latency (default: 1 where ``flows > 0``). Local
    entries (the diagonal) move nothing: ``inv_bw`` and ``lat`` are zero there.
    """
    if used is None:
      used = flows > 0
    send = np.einsum("...nm,nm->...n", flows, self.act * self.inv_bw)
    dispatch = (send + (used * self.lat).max(axis=-1)).max(axis=-1)
    back = np.einsum("...nm,mn->...m", flows, self.act * self.inv_bw)
    combine = (back + (used * self.lat.T).max(axis=-2)).max(axis=-1)
    return dispatch, combine

  def link_time_per_token(self) -> np.ndarray:
    """``[N, N]`` seconds to send one token's activations ``n -> m`` and the result back."""
    return 2.0 * (self.lat + self.act / self.bw)

  def route_cost(self) -> np.ndarray:
    """``[N, M]`` seconds of one remote token-choice ``n -> m``: link time there and back plus
    ``m``'s expert compute per token (what the route tables minimise)."""
    return self.link_time_per_token() + self.expert_flop[None, :]

  def copy_time(self, nbytes: float) -> np.ndarray:
    """``[N, N]`` seconds to copy ``nbytes`` over link ``n -> m`` alone (diagonal 0)."""
    return self.lat + nbytes / self.bw

  def round_time(self, per_link_bytes: np.ndarray) -> float:
    """Seconds of one round of copies moving ``per_link_bytes [N, N]`` over each link at once:
    a server's sends (and receives) are serialised on its NIC, each used link's latency once."""
    xfer = per_link_bytes / self.bw
    used = per_link_bytes > 0
    send = xfer.sum(axis=1) + np.max(np.where(used, self.lat, 0.0), axis=1)
    recv = xfer.sum(axis=0) + np.max(np.where(used, self.lat, 0.0), axis=0)
    return float(max(send.max(), recv.max()))


def _activation_bytes(model: ModelConfig, activation_bytes: int | None) -> int:
  if activation_bytes is None:
    return int(model.activation_bytes)
  if int(activation_bytes) != activation_bytes or activation_bytes <= 0:
    raise HardwareError(f"activation_bytes must be a positive integer (bytes of one token's "
                        f"hidden state on the wire), got {activation_bytes!r}.")
  return int(activation_bytes)
