r"""The cost model: latency, bytes moved and local coverage of a placement on a trace.

Every number the tables report comes from here, and the real JAX dispatch is checked against it
(the bytes counted here equal the bytes the dispatch sends, exactly).

Notation: servers ``n, m`` in ``[0, N)``, MoE layers ``l`` in ``[0, L)``, experts ``e`` in
``[0, E)``, top-``k`` routing. From the cluster: ``bw[n, m]`` bytes/s (diagonal +inf),
``lat[n, m]`` seconds (diagonal 0), ``peak[m]`` FLOP/s, ``mbw[m]`` memory bytes/s; from the
calibration (default 1.0): ``eta_f[m]`` (FLOP efficiency) and ``eta_b[m]`` (bandwidth
efficiency). From the model: ``W_e = expert_bytes``, ``F_e = expert_flops_per_token``,
``W_d = dense_bytes`` (shared experts included), ``F_d = dense_flops_per_token`` and
``a = activation_bytes`` (bf16 hidden state; override e.g. with 4 for float32 execution).

**Steps.** A step is one synchronous pass of the model over every server's current batch:
decode -- one token per active request of the server (:func:`decode_batches` regroups a trace
that way); prefill -- all prompt tokens of a batch of requests (:func:`prefill_batches`). With a
trace, the steps are its distinct ``step`` values, costed independently; ``B[s, n]`` is the
number of tokens of server ``n`` at step ``s``.

**Routing.** Token ``t`` of server ``n`` choosing expert ``e = expert_ids[t, l, r]`` at layer
``l`` is computed on ``m = route[n, l, e]`` and is remote iff ``m != n``. Let
``C[s, l, n, m]`` count the remote token-choices of ``n``'s step-``s`` tokens sent to ``m``
(``C[s, l, n, n] = 0``). Dispatch sends the token's activations once per remote *choice* (no
de-duplication per destination) and the combine returns one vector per remote choice::

  dispatch bytes n -> m :  D[s, l, n, m] = a * C[s, l, n, m]
  combine  bytes m -> n :  D[s, l, n, m]            (the transposed volume)
  cross-server bytes    :  sum_{s, l, n, m} 2 * D[s, l, n, m]

**Expert compute** (roofline per expert actually used; ``c[s, m, l, e]`` = token-choices of
expert ``(l, e)`` computed on ``m`` at step ``s``)::

  P[s, m, l] = sum_{e : c > 0} max(W_e / (mbw[m] eta_b[m]), c[s, m, l, e] F_e / (peak[m] eta_f[m]))

This is a grouped expert FFN that costs per used expert (``moe_edge.kernels.grouped_ffn``), the
default on every server. A server with ``ServerSpec.grouped_kernel=False`` costs as XLA's
``ragged_dot`` measured on the H200 (results/bench_ffn), dense over the ``G[m, l]`` slots it
holds, with ``R[s, m, l] = sum_e c[s, m, l, e]`` rows::

  P[s, m, l] = max(G W_e / (mbw[m] eta_b[m]), R G F_e / (peak[m] eta_f[m]))   (0 when R = 0)

**Exchange** (links work in parallel, a server's sends are serialised on its NIC)::

  dispatch[s, l] = max_n ( max_{m : D[s,l,n,m] > 0} lat[n, m] + sum_m D[s, l, n, m] / bw[n, m] )
  combine[s, l]  = max_m ( max_{n : D[s,l,n,m] > 0} lat[m, n] + sum_n D[s, l, n, m] / bw[m, n] )

(0 when nothing crosses.) A layer is synchronous -- a token waits for its slowest expert::

  layer[s, l] = dispatch[s, l] + max_m P[s, m, l] + combine[s, l]

**Dense part** (attention, router, norms, shared experts, embeddings; every server holds it and
runs it on its own tokens; servers without tokens at a step skip it)::

  dense[s] = max_{n : B[s,n] > 0} max( W_d / (mbw[n] eta_b[n]),  B[s, n] F_d / (peak[n] eta_f[n]) )

With ``attention`` (``CostModel.evaluate(..., attention=True)``, what serving uses) the dense
roofline also streams each request's KV cache and computes its attention scores
(:mod:`moe_edge.cost.attention`: ``A_bytes``/``A_flops`` per step and server from the tokens'
requests and cache positions)::

  dense[s] = max_{n : B[s,n] > 0} max( (W_d + A_bytes[s, n]) / (mbw eta_b),
                                       (B[s, n] F_d + A_flops[s, n]) / (peak eta_f) )

**Step latency** ``T[s] = dense[s] + sum_l layer[s, l]``. Decode latency per token = mean over
steps of ``T[s]``; prefill latency per request = mean over prompt batches of ``T[s]``.

**Coverage** = fraction of token-choices served locally (overall and per server).
**Memory** of server ``n`` = ``sum_{l,e} hosts[n, l, e] W_e + W_d``; it fits when at most
``memory_bytes - reserved_bytes``.

:func:`expected_cost` applies the same formulas to *expected* counts from a
:class:`~moe_edge.core.problem.PlacementProblem` (for planning and migration), with
``x[n, l, e] = batch_tokens[n] * freq[n, l, e]`` token-choices per step:

* ``C``, ``c`` become their expectations (sums of ``x`` along the route table);
* an expert's weight read is charged with the probability that it is used at all, under a
  Poisson model: ``P(c > 0) = 1 - exp(-E[c])``, i.e.
  ``P[m, l] = sum_e max(W_e / (mbw eta_b) * (1 - exp(-E[c])), E[c] F_e / (peak eta_f))``
  (without a grouped kernel: ``max(G W_e / (mbw eta_b) (1 - exp(-E[R])), E[R] G F_e / (peak
  eta_f))``);
* a link's latency is charged with the probability that the link carries anything,
  ``1 - exp(-E[C[l, n, m]])``.

Bytes, load and coverage are linear in the counts, so their expectations are exact. The times
take maxima of expectations where the expectation of a maximum is meant; as ``E[max] >= max E``
(Jensen), the expected step time is a lower bound of the mean step time under the Poisson model,
and it approaches :func:`evaluate` as batches grow and relative fluctuations shrink.

Every formula above is one method of :class:`~moe_edge.core.hardware.Hardware` (expert time,
a server's compute time, exchange time, dense time); :class:`CostModel` holds one Hardware and
is what planners, triggers and the simulator receive (docs/DESIGN.md, "Cost").

Implementation (vectorised numpy; steps are processed in chunks to bound memory,
``cost/counting.py``), one of three exact counting paths per chunk:

* few large steps: token-choices counted densely per (step, source server, layer, expert) with
  one ``bincount``, then pushed through the route table on the counted table (not per choice);
* many small steps where no expert can reach its FLOP-bound regime (``B[s] F_e / peak <= W_e /
  mbw``, every used expert costs its weight read): each token's experts as 64-bit masks, OR-ed
  per (step, computing server) and counted with ``popcount``;
* otherwise: the (step, server, layer, expert) keys are sorted (``np.unique``).

``benchmarks/bench_cost.py`` measures the throughput.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, model_config
from moe_edge.core.errors import CostError, PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.attention import kv_bytes_per_token, kv_budget_bytes, step_attention_work
from moe_edge.cost.batches import decode_batches, prefill_batches  # noqa: F401  (re-export)
from moe_edge.cost.calibrate import Calibration
from moe_edge.cost.counting import RouteMaps, chunks, counting_path
PHASES = ("decode", "prefill")


@dataclasses.dataclass(frozen=True)
class CostReport:
  """Costs of one placement on one workload. Times in seconds, bytes in bytes.

  Attributes:
    phase: ``"decode"`` or ``"prefill"``.
    expected: True for :func:`expected_cost` (expected counts; float bytes), False for a trace.
    num_steps: ``S``, steps costed.
    num_tokens: tokens costed (all servers, all steps).
    activation_bytes: bytes of one token's activations on the wire.
    step_latency: ``[S]`` seconds per step, ``dense_time + sum_l layer time``.
    dense_time: ``[S]`` seconds of the dense part of each step.
    dispatch_time, compute_time, combine_time: ``[L]`` mean over steps of each layer's
      dispatch, slowest-server expert compute and combine time.
    server_compute: ``[N, L]`` mean over steps of each server's expert compute per layer.
    load: ``[N, L]`` token-choices computed on each server per layer, over all steps.
    dispatch_bytes: ``[L, N, N]`` dispatch bytes ``n -> m`` per layer over all steps (int64 for
      a trace; the combine sends the transpose back).
    tokens_per_server: ``[N]`` tokens of each server's stream.
    local_choices, total_choices: ``[N]`` token-choices of each server's tokens served locally /
      in total.
    memory_used: ``[N]`` bytes held (hosted experts and dense weights).
    memory_capacity: ``[N]`` bytes available (``memory_bytes - reserved_bytes``).
    calibration_source: where the efficiency factors came from.
  """
  phase: str
  expected: bool
  num_steps: int
  num_tokens: float
  activation_bytes: int
  step_latency: np.ndarray
  dense_time: np.ndarray
  dispatch_time: np.ndarray
  compute_time: np.ndarray
  combine_time: np.ndarray
  server_compute: np.ndarray
  load: np.ndarray
  dispatch_bytes: np.ndarray
  tokens_per_server: np.ndarray
  local_choices: np.ndarray
  total_choices: np.ndarray
  memory_used: np.ndarray
  memory_capacity: np.ndarray
  calibration_source: str = "datasheet"

  # ---- latency -----------------------------------------------------------------------------
  @property
  def latency(self) -> float:
    """Mean step latency: per token in decode, per request batch in prefill."""
    return float(self.step_latency.mean())

  @property
  def layer_time(self) -> np.ndarray:
    """``[L]`` mean layer time, ``dispatch + compute + combine``."""
    return self.dispatch_time + self.compute_time + self.combine_time

  @property
  def exchange_time(self) -> float:
    """Mean seconds per step spent in dispatch and combine (all layers)."""
    return float(self.dispatch_time.sum() + self.combine_time.sum())

  # ---- bytes -------------------------------------------------------------------------------
  @property
  def bytes_matrix(self) -> np.ndarray:
    """``[N, N]`` bytes sent ``n -> m`` over all layers and steps, dispatch and combine."""
    d = self.dispatch_bytes.sum(axis=0)
    return d + d.T

  @property
  def cross_bytes(self) -> float:
    """Bytes that crossed servers (both directions, all layers, all steps)."""
    return float(2 * self.dispatch_bytes.sum())

  @property
  def cross_bytes_per_step(self) -> float:
    return self.cross_bytes / max(self.num_steps, 1)

  @property
  def cross_bytes_per_token(self) -> float:
    return self.cross_bytes / max(self.num_tokens, 1)

  # ---- coverage ----------------------------------------------------------------------------
  @property
  def coverage(self) -> float:
    """Fraction of all token-choices served on the token's own server."""
    return float(self.local_choices.sum() / max(self.total_choices.sum(), 1))

  @property
  def coverage_per_server(self) -> np.ndarray:
    """``[N]`` local fraction of each server's token-choices (NaN for a server without tokens)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.total_choices > 0, self.local_choices / self.total_choices, np.nan)

  # ---- memory ------------------------------------------------------------------------------
  @property
  def fits_per_server(self) -> np.ndarray:
    return self.memory_used <= self.memory_capacity

  @property
  def fits(self) -> bool:
    return bool(np.all(self.fits_per_server))

  def to_row(self) -> dict:
    """One flat row of the tables (times in ms, bytes in MB = 1e6 bytes)."""
    return dict(
        phase=self.phase, steps=self.num_steps, tokens=float(self.num_tokens),
        latency_ms=1e3 * self.latency, dense_ms=1e3 * float(self.dense_time.mean()),
        dispatch_ms=1e3 * float(self.dispatch_time.sum()),
        compute_ms=1e3 * float(self.compute_time.sum()),
        combine_ms=1e3 * float(self.combine_time.sum()), coverage=self.coverage,
        cross_mb_per_step=self.cross_bytes_per_step / 1e6,
        cross_kb_per_token=self.cross_bytes_per_token / 1e3,
        max_memory_frac=float(np.max(self.memory_used / self.memory_capacity)),
        fits=self.fits, calibration=self.calibration_source)

# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _check_phase(phase: str) -> None:
  if phase not in PHASES:
    raise CostError(f"phase must be one of {PHASES}, got {phase!r}.")


def _activation_bytes(model: ModelConfig, activation_bytes: int | None) -> int:
  if activation_bytes is None:
    return int(model.activation_bytes)
  if int(activation_bytes) != activation_bytes or activation_bytes <= 0:
    raise CostError(f"activation_bytes must be a positive integer (bytes of one token's hidden "
                    f"state on the wire), got {activation_bytes!r}.")
  return int(activation_bytes)


def _check_placement(placement: Placement, shape: tuple[int, int, int], what: str) -> None:
  if not isinstance(placement, Placement):
    raise CostError(f"expected a Placement, got {type(placement).__name__}.")
  if placement.hosts.shape != shape:
    raise CostError(f"placement is [N, L, E] = {list(placement.hosts.shape)} but {what} needs "
                    f"{list(shape)}; place experts for this model and cluster.")
  try:
    placement.validate()
  except PlacementError as e:
    raise CostError(f"invalid placement: {e}") from None


def _memory(model: ModelConfig, cluster: ClusterConfig,
            placement: Placement) -> tuple[np.ndarray, np.ndarray]:
  used = placement.experts_per_server.astype(np.float64) * model.expert_bytes + model.dense_bytes
  cap = np.array([s.memory_bytes - s.reserved_bytes for s in cluster.servers], dtype=np.float64)
  return used, cap


def _check_inputs(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
                  placement: Placement) -> None:
  n_srv, n_lay, n_exp = cluster.num_servers, model.n_moe_layers, model.n_experts
  trace.check_matches(n_lay, n_exp, model.top_k, n_srv)
  _check_placement(placement, (n_srv, n_lay, n_exp),
                   f"model {model.name!r} on cluster {cluster.name!r}")
  if trace.num_tokens == 0:
    raise CostError("the trace has no tokens; nothing to cost.")


def _step_order(trace: ActivationTrace) -> tuple[np.ndarray, np.ndarray | None]:
  """``(step index [T] in 0..S-1, token order sorting by step or None if already sorted)``."""
  _, sidx = np.unique(trace.step, return_inverse=True)
  sidx = sidx.ravel().astype(np.int64)
  if sidx.size < 2 or np.all(sidx[1:] >= sidx[:-1]):
    return sidx, None
  order = np.argsort(sidx, kind="stable")
  return sidx[order], order


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def evaluate(trace: ActivationTrace, model: ModelConfig | str, cluster: ClusterConfig,
             placement: Placement, phase: str = "decode",
             calibration: Calibration | None = None,
             activation_bytes: int | None = None) -> CostReport:
  """Cost ``placement`` on every step of ``trace`` (formulas in the module docstring).

  Args:
    trace: tokens ``T`` with ``expert_ids [T, L, k]``, ``server [T]`` and ``step [T]``.
    model: model config (or preset name) the trace was recorded with.
    cluster: the ``N`` servers and their links.
    placement: ``hosts``/``route`` ``[N, L, E]``.
    phase: ``"decode"`` or ``"prefill"`` (labels what a step is; see :func:`prefill_batches`).
    calibration: per-server efficiency factors (default: the datasheet, factors 1.0).
    activation_bytes: bytes per token-choice on the wire (default ``model.activation_bytes``).
  Returns:
    A :class:`CostReport`.
  Raises:
    CostError (or the trace's TraceError) when the inputs do not fit together.
  """
  model = model_config(model)
  _check_phase(phase)
  _check_inputs(trace, model, cluster, placement)
  hw = Hardware.build(model, cluster, calibration, _activation_bytes(model, activation_bytes))
  return _evaluate(trace, model, cluster, placement, phase, hw)


def _evaluate(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
              placement: Placement, phase: str, hw: Hardware,
              attention: bool = False) -> CostReport:
  """:func:`evaluate` on checked inputs and a built :class:`Hardware`; ``attention`` adds each
  step's attention over its requests' contexts (``trace.request``/``trace.position``) to the
  dense roofline (:mod:`moe_edge.cost.attention`)."""
  n_srv, n_lay, n_exp = cluster.num_servers, model.n_moe_layers, model.n_experts
  act, k = hw.act, model.top_k
  maps = RouteMaps.build(placement.route)

  sidx, order = _step_order(trace)
  ids = trace.expert_ids if order is None else trace.expert_ids[order]
  srv = (trace.server if order is None else trace.server[order]).astype(np.int64)
  n_steps = int(sidx[-1]) + 1
  tokens = np.bincount(sidx * n_srv + srv, minlength=n_steps * n_srv).reshape(n_steps, n_srv)

  dispatch = np.zeros((n_steps, n_lay))
  combine = np.zeros((n_steps, n_lay))
  compute = np.zeros((n_steps, n_lay))
  server_compute = np.zeros((n_srv, n_lay))
  routed_total = np.zeros((n_srv, n_srv, n_lay))
  step_tokens = tokens.sum(axis=1)
  held = placement.hosts.sum(axis=2)                                        # [M, L] slots
  for s0, s1, t0, t1 in chunks(step_tokens, n_lay * k, n_lay * n_srv * n_srv):
    path = counting_path(s1 - s0, (t1 - t0) * n_lay * k, int(step_tokens[s0:s1].max()), maps,
                          hw)
    routed, per = path(ids[t0:t1], srv[t0:t1], sidx[t0:t1] - s0, s1 - s0, maps, hw)
    per = hw.compute_time(per, routed.sum(axis=0), held[:, None, :], server_axis=0)
    routed_total += routed.sum(axis=2)
    disp, comb = hw.exchange_times(routed.reshape(n_srv, n_srv, -1).transpose(2, 0, 1))
    dispatch[s0:s1], combine[s0:s1] = disp.reshape(-1, n_lay), comb.reshape(-1, n_lay)
    compute[s0:s1] = per.max(axis=0)
    server_compute += per.sum(axis=1)

  routed_total = np.rint(routed_total).astype(np.int64).transpose(2, 0, 1)  # [L, N, M]
  local = np.einsum("lnn->n", routed_total)
  load = routed_total.sum(axis=1).T                                          # [M, L]
  dispatch_bytes = routed_total * (1 - np.eye(n_srv, dtype=np.int64)) * act
  used, cap = _memory(model, cluster, placement)
  if attention:
    req = trace.request if order is None else trace.request[order]
    pos = trace.position if order is None else trace.position[order]
    dense_t = hw.dense_time(tokens, *step_attention_work(model, sidx, srv, req, pos, n_steps,
                                                         n_srv))
  else:
    dense_t = hw.dense_time(tokens)
  return CostReport(
      phase=phase, expected=False, num_steps=n_steps, num_tokens=float(trace.num_tokens),
      activation_bytes=act, step_latency=dense_t + (dispatch + compute + combine).sum(axis=1),
      dense_time=dense_t, dispatch_time=dispatch.mean(axis=0),
      compute_time=compute.mean(axis=0), combine_time=combine.mean(axis=0),
      server_compute=server_compute / n_steps, load=load, dispatch_bytes=dispatch_bytes,
      tokens_per_server=trace.tokens_per_server().astype(np.float64),
      local_choices=local.astype(np.float64),
      total_choices=routed_total.sum(axis=(0, 2)).astype(np.float64), memory_used=used,
      memory_capacity=cap, calibration_source=hw.source)


def expected_cost(problem: PlacementProblem, placement: Placement,
                  batch_tokens: Sequence[float] | np.ndarray, phase: str = "decode",
                  calibration: Calibration | None = None,
                  activation_bytes: int | None = None) -> CostReport:
  """Cost of one step with ``batch_tokens [N]`` tokens per server, on expected counts.

  ``x[n, l, e] = batch_tokens[n] * problem.freq[n, l, e]`` token-choices; the formulas of
  :func:`evaluate` are applied to their expectations along the route table, with expert weight
  reads and link latencies charged by the Poisson probability ``1 - exp(-expected count)`` that
  they occur (module docstring). Byte counts in the report are float expectations. Without
  ``calibration`` and ``activation_bytes`` the problem's own ``hardware`` prices the step.
  """
  _check_phase(phase)
  hw = problem.hardware if calibration is None and activation_bytes is None else (
      Hardware.build(problem.model, problem.cluster, calibration,
                     _activation_bytes(problem.model, activation_bytes)))
  return _expected(problem, placement, batch_tokens, phase, hw)


def _expected(problem: PlacementProblem, placement: Placement,
              batch_tokens: Sequence[float] | np.ndarray, phase: str,
              hw: Hardware, attention: tuple[np.ndarray, np.ndarray] | None = None
              ) -> CostReport:
  """:func:`expected_cost` on a built :class:`Hardware`; ``attention``: ``(bytes [N], flops
  [N])`` attention work of the step's requests, in the dense roofline as the simulator prices
  it (``Hardware.dense_time``)."""
  model, cluster = problem.model, problem.cluster
  n_srv, n_lay, n_exp = problem.shape
  _check_placement(placement, problem.shape, "the problem")
  b = np.asarray(batch_tokens, dtype=np.float64)
  if b.shape != (n_srv,) or not np.all(np.isfinite(b)) or np.any(b < 0):
    raise CostError(f"batch_tokens must be [N] = [{n_srv}] finite non-negative tokens per step, "
                    f"got {np.shape(batch_tokens)}.")
  act = hw.act
  x = b[:, None, None] * problem.freq                                  # [N, L, E]
  to = np.eye(n_srv, dtype=np.float64)[placement.route]                # [N, L, E, M] one-hot
  on = np.einsum("nle,nlem->mle", x, to)                               # E[c] [M, L, E]
  flows = np.einsum("nle,nlem->lnm", x, to) * (1.0 - np.eye(n_srv))   # E[C] [L, N, M]
  per = hw.compute_time(hw.expert_time(on, server_axis=0, expected=True).sum(axis=2),
                        on.sum(axis=2), placement.hosts.sum(axis=2), server_axis=0,
                        expected=True)                                 # [M, L]
  dispatch, combine = hw.exchange_times(flows, -np.expm1(-flows))
  if attention is None:
    dense = hw.dense_time(b[None, :])
  else:
    ab, af = (np.asarray(a, dtype=np.float64) for a in attention)
    if ab.shape != (n_srv,) or af.shape != (n_srv,) or not (
        np.all(np.isfinite(ab)) and np.all(np.isfinite(af)) and np.all(ab >= 0)
        and np.all(af >= 0)):
      raise CostError(f"attention must be (bytes [N], flops [N]) = [{n_srv}] finite "
                      f"non-negative work per server, got shapes {ab.shape}, {af.shape}.")
    dense = hw.dense_time(b[None, :], ab[None, :], af[None, :])
  step = dense + (dispatch + per.max(axis=0) + combine).sum()
  total = b * problem.freq.sum(axis=(1, 2))
  local = np.einsum("nle,nlen->n", x, to)
  used, cap = _memory(model, cluster, placement)
  return CostReport(
      phase=phase, expected=True, num_steps=1, num_tokens=float(b.sum()), activation_bytes=act,
      step_latency=step.reshape(1), dense_time=dense.reshape(1), dispatch_time=dispatch,
      compute_time=per.max(axis=0), combine_time=combine, server_compute=per,
      load=on.sum(axis=2), dispatch_bytes=act * flows, tokens_per_server=b,
      local_choices=local, total_choices=total, memory_used=used, memory_capacity=cap,
      calibration_source=hw.source)


def bytes_matrix(trace: ActivationTrace, placement: Placement,
                 activation_bytes: int) -> np.ndarray:
  """``[L, N, N]`` int64: dispatch bytes ``n -> m`` per layer over the whole trace.

  ``activation_bytes`` times the number of token-choices of server ``n``'s tokens that the route
  table sends to ``m != n`` (diagonal zero). The combine sends the transpose back, so the bytes
  crossing servers at layer ``l`` are ``2 * out[l].sum()``. Exact integers; the real dispatch
  must move exactly this.
  """
  if int(activation_bytes) != activation_bytes or activation_bytes <= 0:
    raise CostError(f"activation_bytes must be a positive integer, got {activation_bytes!r}.")
  n_srv, n_lay, n_exp = placement.route.shape
  trace.check_matches(n_lay, n_exp, num_servers=n_srv, what="placement")
  counts = trace.counts()                                                  # [N, L, E]
  to = np.eye(n_srv, dtype=np.int64)[placement.route]                      # [N, L, E, M]
  to[np.arange(n_srv), :, :, np.arange(n_srv)] = 0                         # local: no bytes
  return np.einsum("nle,nlem->lnm", counts, to) * int(activation_bytes)


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
  """One model on one cluster under one calibration: what planners, triggers and the simulator
  receive (docs/DESIGN.md, "Cost").

  Attributes:
    model, cluster: what is priced.
    hardware: the per-server and per-link numbers and formulas (:class:`Hardware`).
    calibration: the efficiency factors the hardware was built with (None: datasheet).
  """
  model: ModelConfig
  cluster: ClusterConfig
  hardware: Hardware
  calibration: Calibration | None = None

  @classmethod
  def build(cls, model: ModelConfig | str, cluster: ClusterConfig,
            calibration: Calibration | None = None,
            activation_bytes: int | None = None) -> "CostModel":
    model = model_config(model)
    hw = Hardware.build(model, cluster, calibration, _activation_bytes(model, activation_bytes))
    return cls(model, cluster, hw, calibration)

  def evaluate(self, trace: ActivationTrace, placement: Placement,
               phase: str = "decode", attention: bool = False) -> CostReport:
    """:func:`evaluate` of ``placement`` on every step of ``trace``; with ``attention`` each
    step also pays attention over its requests' contexts (a token at cache position ``p``
    attends ``p + 1`` keys; the trace's ``request`` and ``position`` say which;
    :mod:`moe_edge.cost.attention`)."""
    _check_phase(phase)
    _check_inputs(trace, self.model, self.cluster, placement)
    return _evaluate(trace, self.model, self.cluster, placement, phase, self.hardware, attention)

  def kv_tokens(self, placement: Placement) -> np.ndarray:
    """``[N]`` int64 KV-cache positions each server has room for once it holds the dense weights
    and ``placement``'s experts: the memory cap binds experts and KV together
    (:func:`moe_edge.cost.attention.kv_budget_bytes`)."""
    budget = kv_budget_bytes(self.model, self.cluster, placement.experts_per_server)
    return (budget // kv_bytes_per_token(self.model)).astype(np.int64)

  def expected(self, problem: PlacementProblem, placement: Placement,
               batch_tokens: Sequence[float] | np.ndarray,
               phase: str = "decode",
               attention: tuple[np.ndarray, np.ndarray] | None = None) -> CostReport:
    """:func:`expected_cost` of one step with ``batch_tokens [N]`` tokens per server; with
    ``attention = (bytes [N], flops [N])`` the step also pays its requests' attention work
    (:func:`moe_edge.cost.attention.step_attention_work` of a real step,
    :func:`moe_edge.cost.request_latency.workload_attention` of a workload's mean step) in the
    dense roofline, as the simulator's steps do."""
    _check_phase(phase)
    if problem.cluster.num_servers != self.cluster.num_servers or (
        problem.model.name != self.model.name):
      raise CostError(f"the problem is model {problem.model.name!r} on "
                      f"{problem.cluster.num_servers} servers but this cost model prices "
                      f"{self.model.name!r} on {self.cluster.num_servers}.")
    return _expected(problem, placement, batch_tokens, phase, self.hardware, attention)

  def problem(self, freq: np.ndarray, tokens: np.ndarray | None = None,
              capacity: np.ndarray | None = None) -> PlacementProblem:
    """A placement problem of this model and cluster priced on this cost model's hardware."""
    return PlacementProblem.build(self.model, self.cluster, freq, tokens, capacity,
                                  self.calibration)
