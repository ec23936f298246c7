r"""The request-level simulator: the engine's scheduler and loop, step times from the cost model.

:func:`simulate` runs :func:`moe_edge.serving.loop.run_loop` (the engine's loop, the same pure
scheduler) on a virtual clock: every step's tokens get their expert choices from a routing
source, and :class:`~moe_edge.serving.step_cost.StepCost` prices the steps on that routing (the
formulas of ``CostModel.evaluate``, with attention over every request's context when the step
cost has ``attention=True``; bytes exact). Given the same requests, options, step cost and the
engine's routing (:meth:`ReplayRouting.from_engine`), it forms the same steps and batches and
reports the same bytes as the engine (a test compares them exactly; planning one step at a time,
the times too). No JAX: it runs at any scale (hundreds of servers, paper-size models).

Speed (the planner is cheap, a cost-model call is not): the loop plans up to ``lookahead``
steps ahead of the next event (an arrival, a controller check) and the simulator costs them in
one vectorised :meth:`StepCost.steps`; the steps that would start after the event are dropped
and re-planned (:mod:`moe_edge.serving.loop`).

Routing sources:

* :class:`ReplayRouting`: recorded choices per request and position (from an engine run).
* :class:`SampledRouting`: each token's ``k`` experts per layer drawn from its request's domain
  in a :class:`~moe_edge.core.routing_stats.RoutingStats` (Gumbel-top-k on the calibrated
  weights of :func:`moe_edge.workload.stats_traces.sampling_log_weights`, the sampler of the
  statistics-driven traces, so each expert's inclusion frequency equals the measured one);
  ``pool=P > 0`` draws ``P`` exact top-k sets per (domain, layer) once and lets tokens pick among
  them uniformly (an empirical version of the same law, for hundreds of servers).

KV memory (``kv_tokens``): the options' budgets; ``"placement"``: each server's memory left
after the dense weights and its placement's experts (:meth:`CostModel.kv_tokens`), following
the placement through migrations; or fixed ``[N]`` positions. Admission reserves prompt plus
output.

Migration: a ``controller(t, window, placement)`` is called every ``check_every_s`` simulated
seconds with the :class:`Window` of recent routing counts; it may return a new placement and
the seconds serving stalls while the weights move (stop-the-world). Running requests keep their
KV reservations.

A queue that keeps growing (more than ``max_waiting`` requests waiting on one server) means the
offered load exceeds what the cluster serves: :class:`~moe_edge.serving.loop.QueueDivergesError`,
one line.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from moe_edge.core.problem import Placement
from moe_edge.core.routing_stats import RoutingStats
from moe_edge.cost.model import CostModel
from moe_edge.serving import loop as loop_lib
from moe_edge.serving import scheduler as sched
from moe_edge.serving.loop import QueueDivergesError
from moe_edge.serving.metrics import RequestRecord, StepRecord
from moe_edge.serving.step_cost import StepCost
from moe_edge.serving.window import Window
from moe_edge.workload.requests import Requests
from moe_edge.workload.stats_traces import sampling_log_weights

LOOKAHEAD = 256  # steps planned and costed at once


class SimulatorError(sched.SchedulerError):
  """The simulator's inputs do not fit together (routing of another model, unknown domains)."""


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

  def sample(self, request: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``[T, L, k]`` recorded choices of tokens ``(request [T], position [T])``."""
    out = []
    for r, p in zip(request.tolist(), position.tolist()):
      got = self.choices.get(r)
      if got is None or p >= got.shape[0]:
        raise SimulatorError(f"the replayed routing has no choices for request {r} at "
                             f"position {p}; record the same requests.")
      out.append(got[p])
    return np.stack(out).astype(np.int32)


def top_k_sample(log_w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """``[..., k]`` distinct experts per row of ``log_w [..., E]`` (float32, consumed): the set
  of the ``k`` largest Gumbel-perturbed keys, as :func:`moe_edge.workload.sampling.gumbel_top_k`
  draws it, without ordering the set (the cost of a step does not depend on the ranks)."""
  noise = rng.standard_exponential(size=log_w.shape, dtype=np.float32)
  np.maximum(noise, np.finfo(np.float32).tiny, out=noise)
  np.log(noise, out=noise)
  log_w -= noise
  e = log_w.shape[-1]
  return np.argpartition(log_w, e - k, axis=-1)[..., e - k:].astype(np.int32)


def _mix32(x: np.ndarray) -> np.ndarray:
  """A 32-bit integer hash (the "lowbias32" finaliser), elementwise on uint32, in place."""
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  x ^= x >> np.uint32(16)
  return x


def token_keys(seed: int, request: np.ndarray, position: np.ndarray) -> np.ndarray:
  """``[T]`` uint32 key of each token ``(seed, request, position)``: the only input of its
  draws, so a token's experts do not depend on how or when the steps were batched."""
  with np.errstate(over="ignore"):
    x = _mix32(np.full(request.shape, np.uint32(seed & 0xFFFFFFFF)) ^ np.uint32(0x9E3779B9))
    x = _mix32(x ^ request.astype(np.uint32))
    return _mix32(x ^ (position.astype(np.uint32) * np.uint32(0x85EBCA6B)))


def token_uniforms(keys: np.ndarray, width: int) -> np.ndarray:
  """``[T, width]`` float32 uniforms in ``(0, 1)`` of tokens with ``keys [T]`` (counter-based:
  entry ``j`` of token ``t`` is a hash of ``(keys[t], j)``)."""
  with np.errstate(over="ignore"):
    x = keys[:, None] ^ (np.arange(1, width + 1, dtype=np.uint32) * np.uint32(0x9E3779B9))[None]
    x = _mix32(x)
  return ((x >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)


class SampledRouting:
  """Choices sampled per request from its domain's routing statistics (module docstring).

  Args:
    stats: routing statistics of the model (``L``, ``E``, ``k`` must match it).
    domains: the domain of every request (``Requests.domain``); each must be in ``stats``.
    seed: seeds the pools and the draws.
    pool: 0 draws every token exactly; ``P > 0``: tokens pick among ``P`` draws per (domain,
      layer).
  """

  def __init__(self, stats: RoutingStats, domains: Sequence[str], seed: int = 0,
               pool: int = 0):
    missing = sorted(set(domains) - set(stats.domains))
    if missing:
      raise SimulatorError(f"the workload has domain(s) {missing} but routing stats "
                           f"{stats.name!r} have only {', '.join(stats.domains)}; draw the "
                           f"requests from those domains or use stats that have them.")
    self.log_w = sampling_log_weights(stats).astype(np.float32)        # [D, L, E]
    with np.errstate(over="ignore"):
      self.inv_w = np.exp(-self.log_w)                                  # [D, L, E], inf: never
    self.row = np.array([stats.domain_index(d) for d in domains], dtype=np.int64)
    self.seed = int(seed)
    self.num_layers, self.num_experts, self.top_k = stats.num_layers, stats.num_experts, \
        stats.top_k
    self.pools = None
    if pool > 0:  # [D, L, P, k]
      self.pools = top_k_sample(np.repeat(self.log_w[:, :, None, :], pool, axis=2), self.top_k,
                                np.random.default_rng(seed))

  def sample(self, request: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``[T, L, k]`` experts of the tokens at ``position [T]`` of ``request [T]``: independent
    draws, each a function of ``(seed, request, position)`` only (:func:`token_keys`), so the
    same token gets the same experts under any batching, placement or time scale."""
    request, position = np.asarray(request), np.asarray(position)
    if position.shape != request.shape:
      raise SimulatorError(f"sample needs one position per token, got {position.shape} "
                           f"positions for {request.shape} requests.")
    keys = token_keys(self.seed, request, position)
    l, e = self.num_layers, self.num_experts
    if self.pools is None:  # the k largest log(u) / w: Gumbel-top-k on log w (Efraimidis-Spirakis)
      key = np.log(token_uniforms(keys, l * e)).reshape(request.size, l, e)
      key *= self.inv_w[self.row[request]]
      return np.argpartition(key, e - self.top_k, axis=-1)[..., e - self.top_k:].astype(np.int32)
    p = self.pools.shape[2]
    pick = (token_uniforms(keys, l) * p).astype(np.int64).clip(0, p - 1)
    return self.pools[self.row[request][:, None], np.arange(l)[None, :], pick]


Controller = Callable[[float, Window, Placement], tuple[Placement | None, float]]


@dataclasses.dataclass(frozen=True)
class Migration:
  """A placement change at ``time_s`` that stalled serving for ``stall_s``."""
  time_s: float
  stall_s: float
  copies: int
  note: str


@dataclasses.dataclass(frozen=True)
class SimResult:
  """What :func:`simulate` returns: the metrics schema's records plus routing totals."""
  requests: tuple[RequestRecord, ...]
  steps: tuple[StepRecord, ...]
  local_choices: int
  total_choices: int
  migrations: tuple[Migration, ...]
  window: Window

  @property
  def loop(self) -> loop_lib.LoopResult:
    """The records as the engine reports them."""
    return loop_lib.LoopResult(self.requests, self.steps)

  @property
  def cross_bytes(self) -> int:
    return int(sum(s.cross_bytes for s in self.steps))

  @property
  def tokens_fed(self) -> int:
    return int(sum(sum(s.prefill_tokens) + sum(s.decode_tokens) for s in self.steps))

  @property
  def coverage(self) -> float:
    return self.local_choices / max(self.total_choices, 1)

  def latencies(self) -> np.ndarray:
    return np.array([r.finish_s - r.arrival_s for r in self.requests])

  @property
  def busy_fraction(self) -> float:
    """Share of the span (first arrival to last finish) the cluster spent in steps: near 1,
    the offered load is at what the cluster serves and queueing dominates latency."""
    if not self.requests:
      return 0.0
    span = max(r.finish_s for r in self.requests) - min(r.arrival_s for r in self.requests)
    return float(sum(s.duration_s for s in self.steps) / max(span, 1e-12))


def plan_tokens(plans: Sequence) -> tuple[np.ndarray, ...]:
  """``(step [T], server [T], request [T], position [T])`` of every token the plans feed, in
  the engine's order (per step and server: prompt chunks, then decodes)."""
  step, server, request, position = [], [], [], []
  for s, plan in enumerate(plans):
    for n, st in enumerate(plan):
      for c in st.prefill:
        step.append(np.full(c.length, s))
        server.append(np.full(c.length, n))
        request.append(np.full(c.length, c.request))
        position.append(np.arange(c.start, c.start + c.length))
      if st.decode:
        step.append(np.full(len(st.decode), s))
        server.append(np.full(len(st.decode), n))
        request.append(np.array([d.request for d in st.decode]))
        position.append(np.array([d.position for d in st.decode]))
  return tuple(np.concatenate(a).astype(np.int32) for a in (step, server, request, position))


class _Executor:
  """Routes and costs planned steps on the current placement; tallies the kept ones."""

  def __init__(self, cost: StepCost, routing, placement: Placement, bin_s: float):
    self.cost, self.routing, self.placement = cost, routing, placement
    n, l, e = placement.route.shape
    self.window = Window(bin_s, (n, l, e))
    self.local = self.total = 0
    self._last = None

  def __call__(self, index: int, plans) -> loop_lib.StepOutcome:
    del index
    step, server, request, position = plan_tokens(plans)
    ids = self.routing.sample(request, position)                       # [T, L, k]
    seconds, remote = self.cost.steps(self.placement, step, server, ids, len(plans), request,
                                      position)
    batches = np.array([[(st.prefill_tokens, st.decode_tokens) for st in plan] for plan in plans],
                       dtype=np.int64).reshape(len(plans), -1, 2)          # [S, N, 2]
    self._last = (step, server, ids, remote, batches)
    return loop_lib.StepOutcome(seconds, 2 * self.cost.cost.hardware.act * remote)

  def commit(self, kept: int, start_s) -> None:
    step, server, ids, remote, batches = self._last
    start_s = np.asarray(start_s)
    sel = step < kept
    self.window.add(start_s, step[sel], server[sel], ids[sel])
    self.window.add_steps(start_s)
    self.window.add_mix(start_s, batches[:kept, :, 0], batches[:kept, :, 1])
    k_choices = ids.shape[1] * ids.shape[2]
    self.total += int(sel.sum()) * k_choices
    self.local += int(sel.sum()) * k_choices - int(remote[:kept].sum())


def _check(routing, cost: StepCost, placement: Placement) -> None:
  cfg, n_srv = cost.model, cost.cluster.num_servers
  if isinstance(routing, SampledRouting) and (
      routing.num_layers, routing.num_experts, routing.top_k) != (
      cfg.n_moe_layers, cfg.n_experts, cfg.top_k):
    raise SimulatorError(f"the routing has L, E, k = {routing.num_layers}, "
                         f"{routing.num_experts}, {routing.top_k} but model {cfg.name!r} has "
                         f"{cfg.n_moe_layers}, {cfg.n_experts}, {cfg.top_k}; use its stats.")
  if placement.route.shape[0] != n_srv:
    raise SimulatorError(f"the placement is for {placement.route.shape[0]} servers, the cluster "
                         f"has {n_srv}.")


def simulate(requests: Requests, placement: Placement, cost: StepCost | CostModel,
             options: sched.SchedulerOptions, routing, max_waiting: int | None = 100,
             controller: Controller | None = None, check_every_s: float = math.inf,
             bin_s: float = 30.0, kv_tokens: str | Sequence[int] | None = None,
             context: int | None = None, lookahead: int = LOOKAHEAD) -> SimResult:
  """Serve ``requests`` to completion on the cost model (module docstring).

  Args:
    requests: the workload, sorted by arrival.
    placement: the initial placement.
    cost: the step cost; a :class:`CostModel` means ``StepCost.of(cost, attention=True)``.
    options: the scheduler's options.
    routing: a :class:`SampledRouting` or :class:`ReplayRouting`.
    max_waiting: waiting requests on one server that mean the queue diverges (None: no limit).
    controller: migration hook (module docstring), called every ``check_every_s``.
    bin_s: resolution of the routing-count window the controller sees.
    kv_tokens: ``None`` (the options'), ``"placement"`` or ``[N]`` positions (module docstring).
    context: the model's context length (default ``cost.model.max_seq_len``).
    lookahead: steps planned and costed at once (1: step by step, as the engine).
  """
  if isinstance(cost, CostModel):
    cost = StepCost.of(cost, attention=True)
  _check(routing, cost, placement)
  if isinstance(kv_tokens, str):
    if kv_tokens != "placement":
      raise SimulatorError(f"kv_tokens={kv_tokens!r}; use None, 'placement' or [N] positions.")
    budget = cost.cost.kv_tokens
  elif kv_tokens is not None:
    budget = lambda p: np.asarray(kv_tokens)  # noqa: E731
  else:
    budget = None
  if budget is not None:
    options = dataclasses.replace(options, kv_tokens=tuple(int(x) for x in budget(placement)))
  run = _Executor(cost, routing, placement, bin_s)
  migrations: list[Migration] = []

  def control(t: float) -> loop_lib.Control | None:
    new, stall = controller(t, run.window, run.placement)
    if new is None:
      return None
    migrations.append(Migration(t, float(stall), int(new.info.get("copies", 0)),
                                str(new.info.get("note", ""))))
    change = None
    if budget is not None and kv_tokens == "placement":
      change = np.asarray(budget(new), np.int64) - np.asarray(budget(run.placement), np.int64)
    run.placement = new
    return loop_lib.Control(float(stall), change)

  ctx = cost.model.max_seq_len if context is None else int(context)
  res = loop_lib.run_loop(requests, cost.cluster.num_servers, options, ctx, run,
                          loop_lib.VirtualClock(), max_waiting=max_waiting,
                          controller=control if controller is not None else None,
                          check_every_s=check_every_s, lookahead=lookahead)
  return SimResult(res.requests, res.steps, run.local, run.total, tuple(migrations), run.window)


__all__ = ["LOOKAHEAD", "Migration", "QueueDivergesError", "ReplayRouting", "SampledRouting",
           "SimResult", "SimulatorError", "Window", "plan_tokens", "simulate", "top_k_sample"]
