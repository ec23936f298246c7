"""The request-level simulator: the engine's scheduler and loop, step times from the cost model.

:func:`simulate` runs :func:`moe_edge.serving.loop.run_loop` (the engine's loop, the same pure
scheduler) on a virtual clock: every step's tokens get their expert choices from a routing
source, and :class:`~moe_edge.serving.step_cost.StepCost` prices the step on that routing (the
formulas of the CostModel; bytes exact). Given the same requests, options and the engine's
routing (:meth:`ReplayRouting.from_engine`), it forms the same steps and batches, and reports the
same bytes and times, as the engine on its virtual clock (a test compares them exactly). No JAX:
it runs at any scale (hundreds of servers, paper-size models).

Routing sources:

* :class:`ReplayRouting`: recorded choices per request and position (from an engine run, or a
  trace).
* :class:`SampledRouting`: each token's ``k`` experts per layer drawn from its request's domain
  in a :class:`~moe_edge.core.routing_stats.RoutingStats` (Gumbel-top-k on the calibrated
  Plackett-Luce weights of :func:`moe_edge.workload.stats_traces.sampling_log_weights`, whose
  top-k inclusion matches the measured counts). For speed each (domain, layer) draws a pool of
  ``pool`` top-k sets once and tokens pick pool entries uniformly: an empirical version of the
  same distribution (``pool=1024`` by default).

A workload the cluster cannot keep up with is reported, not run forever: ``max_waiting``
requests waiting on one server raise :class:`~moe_edge.serving.loop.QueueDivergesError`.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from moe_edge.core.problem import Placement
from moe_edge.core.routing_stats import RoutingStats
from moe_edge.serving import loop as loop_lib
from moe_edge.serving import scheduler as sched
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import Requests
from moe_edge.workload.stats_traces import sampling_log_weights


class SimulatorError(sched.SchedulerError):
  """The simulator's inputs do not fit together (routing of another model, unknown domains)."""


class Routing(Protocol):
  def tokens(self, request: int, start: int, count: int) -> np.ndarray:
    """``[count, L, k] int`` choices of positions ``start .. start + count - 1``."""


@dataclasses.dataclass(frozen=True, eq=False)
class ReplayRouting:
  """Recorded choices: ``choices[request]`` is ``[positions, L, k]`` (position ``p`` = the
  token fed at cache position ``p``)."""
  choices: dict[int, np.ndarray]

  @classmethod
  def from_engine(cls, routing: Sequence) -> "ReplayRouting":
    """From :attr:`moe_edge.serving.engine.EngineResult.routing` (one entry per step)."""
    parts: dict[int, dict[int, np.ndarray]] = {}
    for step in routing:
      for r, p, ids in zip(step.request, step.position, step.expert_ids):
        parts.setdefault(int(r), {})[int(p)] = ids
    return cls({r: np.stack([d[p] for p in range(len(d))]) for r, d in parts.items()})

  def tokens(self, request: int, start: int, count: int) -> np.ndarray:
    got = self.choices.get(request)
    if got is None or start + count > got.shape[0]:
      raise SimulatorError(f"the replayed routing has no choices for request {request} at "
                           f"positions {start}..{start + count - 1}; record the same requests.")
    return got[start:start + count]


class SampledRouting:
  """Choices sampled per request from its domain's routing statistics (module docstring).

  Args:
    stats: routing statistics of the model (``L``, ``E``, ``k`` must match it).
    domains: the domain of every request (``Requests.domain``); each must be in ``stats``.
    seed: seeds the pools and the per-token picks.
    pool: top-k sets drawn per (domain, layer).
  """

  def __init__(self, stats: RoutingStats, domains: Sequence[str], seed: int = 0,
               pool: int = 1024):
    missing = sorted(set(domains) - set(stats.domains))
    if missing:
      raise SimulatorError(f"the workload has domain(s) {missing} but routing stats "
                           f"{stats.name!r} have only {', '.join(stats.domains)}; draw the "
                           f"requests from those domains or use stats that have them.")
    rng = np.random.default_rng(seed)
    used = sorted(set(domains), key=stats.domains.index)  # pools only for domains in use
    logw = sampling_log_weights(stats, seed)[[stats.domains.index(x) for x in used]]
    d, l, e = logw.shape                                                  # [D', L, E]
    self.pools = np.empty((d, l, pool, stats.top_k), np.int32)
    for i in range(d):
      u = rng.random((l, pool, e), dtype=np.float32)
      g = logw[i][:, None, :].astype(np.float32) - np.log(-np.log(u))  # Gumbel-top-k
      self.pools[i] = np.argpartition(-g, stats.top_k - 1, axis=-1)[..., :stats.top_k]
    self.domain = np.array([used.index(x) for x in domains], np.int64)
    self.num_layers, self.top_k, self.num_experts = l, stats.top_k, e
    self._rng = rng
    self._layers = np.arange(l)[None, :]

  def tokens(self, request: int, start: int, count: int) -> np.ndarray:
    del start  # tokens are independent draws
    return self.batch(np.array([request]), np.array([count]))

  def batch(self, requests: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Choices of ``counts[i]`` tokens of each ``requests[i]``, concatenated ``[T, L, k]``."""
    dom = np.repeat(self.domain[requests], counts)[:, None]
    pick = self._rng.integers(0, self.pools.shape[2], size=(dom.shape[0], self.num_layers))
    return self.pools[dom, self._layers, pick]


@dataclasses.dataclass(frozen=True)
class SimulationResult:
  """The loop's records; ``cross_bytes`` per step equals ``loop.steps[i].cross_bytes``."""
  loop: loop_lib.LoopResult


def _check_routing(routing, cost: StepCost) -> None:
  if isinstance(routing, SampledRouting):
    cfg = cost.model
    if (routing.num_layers, routing.num_experts, routing.top_k) != (
        cfg.n_moe_layers, cfg.n_experts, cfg.top_k):
      raise SimulatorError(f"the routing has L, E, k = {routing.num_layers}, "
                           f"{routing.num_experts}, {routing.top_k} but model {cfg.name!r} has "
                           f"{cfg.n_moe_layers}, {cfg.n_experts}, {cfg.top_k}; use its stats.")


def simulate(requests: Requests, placement: Placement, cost: StepCost,
             options: sched.SchedulerOptions, routing, context: int | None = None,
             max_waiting: int | None = 1000) -> SimulationResult:
  """Serve ``requests`` on the cost model (module docstring).

  Args:
    requests: the workload.
    placement: the placement every step is priced on.
    cost: the step cost (model and cluster).
    options: the scheduler's options.
    routing: a :class:`ReplayRouting` or :class:`SampledRouting`.
    context: the model's context length (default ``cost.model.max_seq_len``).
    max_waiting: waiting requests on one server that mean the queue diverges (None: no limit).
  """
  _check_routing(routing, cost)
  n_srv = cost.cluster.num_servers
  if placement.route.shape[0] != n_srv:
    raise SimulatorError(f"the placement is for {placement.route.shape[0]} servers, the cluster "
                         f"has {n_srv}.")
  shape = (0, cost.model.n_moe_layers, cost.model.top_k)

  def execute(index: int, steps: tuple[sched.ServerStep, ...]) -> loop_lib.StepOutcome:
    del index
    if isinstance(routing, SampledRouting):  # one draw for the whole step
      reqs, counts, srv = [], [], []
      for n, s in enumerate(steps):
        for c in s.prefill:
          reqs.append(c.request), counts.append(c.length), srv.append(n)
        for d in s.decode:
          reqs.append(d.request), counts.append(1), srv.append(n)
      counts = np.array(counts)
      seconds, nbytes = cost.step(routing.batch(np.array(reqs), counts),
                                  np.repeat(np.array(srv, np.int32), counts), placement)
      return loop_lib.StepOutcome(seconds, nbytes)
    ids, srv = [], []
    for n, s in enumerate(steps):  # the engine's token order: chunks, then decodes
      for c in s.prefill:
        ids.append(routing.tokens(c.request, c.start, c.length))
        srv.append(np.full(c.length, n, np.int32))
      for d in s.decode:
        ids.append(routing.tokens(d.request, d.position, 1))
        srv.append(np.full(1, n, np.int32))
    expert_ids = np.concatenate(ids) if ids else np.zeros(shape, np.int32)
    seconds, nbytes = cost.step(expert_ids, np.concatenate(srv) if srv else np.zeros(0, np.int32),
                                placement)
    return loop_lib.StepOutcome(seconds, nbytes)

  ctx = cost.model.max_seq_len if context is None else int(context)
  res = loop_lib.run_loop(requests, n_srv, options, ctx, execute, loop_lib.VirtualClock(),
                          max_waiting=max_waiting)
  return SimulationResult(res)


__all__ = ["ReplayRouting", "SampledRouting", "SimulationResult", "SimulatorError", "simulate"]
