r"""Request-level simulation of serving on the cost model: the engine's scheduler, event-driven
over request arrivals, each step's time from the CostModel on that step's own routing.

Per cluster step (the same pure planner the engine runs, :mod:`moe_edge.serving.scheduler`):
every fed token (prompt chunks and decodes of every server) draws its ``top_k`` experts per
layer from the routing statistics of its request's domain (Gumbel-top-k on the calibrated
weights of :func:`moe_edge.workload.stats_traces.sampling_log_weights`, the sampler of the
statistics-driven traces, so each expert's inclusion frequency equals the measured one); the step's time is :meth:`moe_edge.cost.model.CostModel.evaluate`
with attention over every request's context (``attention=True``: a token at cache position
``p`` attends ``p + 1`` keys); its cross-server bytes are exact,
``2 * activation_bytes * (remote token-choices)`` with remote meaning ``route[n, l, e] != n``.
A token exists at the end of the step that produced it (first token: the step that fed the last
prompt token). When no server has anything to feed, time jumps to the next arrival.

Speed (the planner is cheap, a cost-model call is not): steps are planned ahead from the
current queue state up to the next event (an arrival, a controller check), their tokens'
routing sampled and costed in one vectorised :meth:`CostModel.evaluate` over all of them, and
the steps that would start after the event are dropped and re-planned with it. The result is
the same as costing step by step: the plan of a step depends only on the queue state, which
depends on time only through arrivals, and every step is costed on its own routing.

KV memory: each server's KV budget is what its memory holds after the dense weights and its
placement's experts (:meth:`CostModel.kv_tokens`); admission reserves prompt plus output.

A queue that keeps growing (more than ``max_waiting`` requests waiting on one server) means
the offered load exceeds what the cluster serves: :class:`QueueDivergesError`, one line.

Migration: a ``controller`` is called every ``check_every_s`` simulated seconds with the
simulation's :class:`Window` of recent routing counts; it may return a new placement and the
seconds serving stalls while the weights move (stop-the-world: no step runs meanwhile). The
servers' KV budgets follow the new placement; running requests keep their reservations.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from moe_edge.core.errors import MoeEdgeError
from moe_edge.core.problem import Placement
from moe_edge.core.routing_stats import RoutingStats
from moe_edge.cost.attention import step_attention_work
from moe_edge.cost.model import CostModel
from moe_edge.serving import scheduler as sched
from moe_edge.serving.metrics import RequestRecord, StepRecord
from moe_edge.workload.requests import Requests
from moe_edge.workload.stats_traces import sampling_log_weights

MAX_LOOKAHEAD = 256  # steps planned and costed at once


class QueueDivergesError(MoeEdgeError):
  """The offered load exceeds what the cluster serves: a server's queue keeps growing."""


@dataclasses.dataclass
class Window:
  """Routing counts of the served tokens in bins of ``bin_s`` simulated seconds.

  ``counts[b]``: ``[N, L, E]`` token-choices per server, layer and expert of the steps that
  started in bin ``b``; ``tokens[b]``: ``[N]`` tokens fed; ``steps[b]``: steps started.
  """
  bin_s: float
  shape: tuple[int, int, int]
  counts: dict = dataclasses.field(default_factory=dict)
  tokens: dict = dataclasses.field(default_factory=dict)
  steps: dict = dataclasses.field(default_factory=dict)

  def add_steps(self, start_s: np.ndarray) -> None:
    for b, c in zip(*np.unique(np.floor(start_s / self.bin_s).astype(np.int64),
                               return_counts=True)):
      self.steps[int(b)] = self.steps.get(int(b), 0) + int(c)

  def add(self, start_s: np.ndarray, step_of_token: np.ndarray, server: np.ndarray,
          ids: np.ndarray) -> None:
    n, l, e = self.shape
    b_tok = np.floor(start_s[step_of_token] / self.bin_s).astype(np.int64)
    for b in np.unique(b_tok):
      sel = b_tok == b
      srv = server[sel]
      key = ((srv[:, None, None] * l + np.arange(l)[None, :, None]) * e + ids[sel]).ravel()
      c = np.bincount(key, minlength=n * l * e).reshape(n, l, e)
      t = np.bincount(srv, minlength=n)
      self.counts[int(b)] = self.counts.get(int(b), 0) + c
      self.tokens[int(b)] = self.tokens.get(int(b), 0) + t

  def totals(self, t0: float, t1: float, parity: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(counts [N, L, E], tokens [N], steps)`` of the bins inside ``[t0, t1)`` (only bins
    of the given ``parity`` when set: two disjoint halves of a window)."""
    n, l, e = self.shape
    c, t, s = np.zeros((n, l, e)), np.zeros(n), 0
    for b in self.steps:
      if t0 <= b * self.bin_s and (b + 1) * self.bin_s <= t1 + 1e-9 and (
          parity is None or b % 2 == parity):
        c += self.counts.get(b, 0)
        t += self.tokens.get(b, 0)
        s += self.steps[b]
    return c, t, s


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


@dataclasses.dataclass
class _Batch:
  """Steps planned ahead from one queue state: the plans, the states after each, events."""
  plans: list
  states: list
  events: list


def _plan_ahead(queues, options, limit: int) -> _Batch:
  batch = _Batch([], [], [])
  for _ in range(limit):
    plan = sched.plan_step(queues, options)
    if sched.idle(plan):
      break
    queues, events = sched.advance(queues, plan)
    batch.plans.append(plan)
    batch.states.append(queues)
    batch.events.append(events)
  return batch


def _tokens(plans: Sequence) -> tuple[np.ndarray, ...]:
  """``(step [T], server [T], request [T], position [T])`` of every token the plans feed."""
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


_FLOW_CHUNK = 1 << 22  # entries of the dense [S_c, L, N, N] flow counts per chunk of steps


def step_costs(cost: CostModel, placement: Placement, step: np.ndarray, server: np.ndarray,
               request: np.ndarray, position: np.ndarray, ids: np.ndarray,
               num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """``(seconds [S], remote [S])``: every step's time and remote token-choices.

  The formulas of :meth:`CostModel.evaluate` with ``attention=True``, all through the cost
  model's :class:`~moe_edge.core.hardware.Hardware`: expert time per used (server, layer,
  expert) from sparse counts (any number of servers), exchange times on dense ``[L, N, N]``
  flows in chunks of steps, the dense part with the steps' attention work. Equal to
  ``CostModel.evaluate(trace, placement, attention=True).step_latency`` (a test checks it);
  no ``[N, L, E, N]`` table is built, so 256 servers fit.

  Args:
    step, server, request, position: ``[T]`` each fed token's step (``0..S-1``), server,
      request and cache position.
    ids: ``[T, L, k]`` its experts.
  """
  hw, model = cost.hardware, cost.model
  n, n_lay = cost.cluster.num_servers, model.n_moe_layers
  t, _, k = ids.shape
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
  per = np.bincount(cell, weights=hw.expert_time(count.astype(np.float64), servers=m_of),
                    minlength=num_steps * n * n_lay).reshape(num_steps, n, n_lay)
  compute = per.max(axis=1)                                             # [S, L]
  # exchange: remote token-choices n -> m per (step, layer), dense per chunk of steps
  exchange = np.zeros((num_steps, n_lay))
  flow_key = ((stp * n_lay + lay) * n + src) * n + dest
  flow_key = flow_key[remote]
  span = max(1, _FLOW_CHUNK // (n_lay * n * n))
  for s0 in range(0, num_steps, span):
    s1 = min(num_steps, s0 + span)
    lo, hi = s0 * n_lay * n * n, s1 * n_lay * n * n
    sel = flow_key[(flow_key >= lo) & (flow_key < hi)] - lo
    flows = np.bincount(sel, minlength=hi - lo).reshape(s1 - s0, n_lay, n, n).astype(float)
    dispatch, combine = hw.exchange_times(flows)
    exchange[s0:s1] = dispatch + combine
  # dense part with attention
  tokens = np.bincount(step * n + server, minlength=num_steps * n).reshape(num_steps, n)
  ab, af = step_attention_work(model, step, server, request, position, num_steps, n)
  dense = hw.dense_time(tokens, ab, af)
  return dense + (compute + exchange).sum(axis=1), n_remote.astype(np.int64)


class _Costing:
  """Samples the planned tokens' routing and costs them on the current placement."""

  def __init__(self, cost: CostModel, stats: RoutingStats, requests: Requests, seed: int,
               pool: int = 0):
    self.cost = cost
    self.log_w = sampling_log_weights(stats).astype(np.float32)      # [D, L, E]
    self.row = np.array([stats.domain_index(d) for d in requests.domain], dtype=np.int64)
    self.rng = np.random.default_rng(seed)
    self.k = cost.model.top_k
    self.pools = None
    if pool > 0:  # [D, L, P, k]: P exact draws per (domain, layer), picked uniformly
      d, l, e = self.log_w.shape
      self.pools = top_k_sample(np.repeat(self.log_w[:, :, None, :], pool, axis=2), self.k,
                                self.rng)

  def sample(self, request: np.ndarray) -> np.ndarray:
    """``[T, L, k]`` experts of tokens of ``request [T]``."""
    if self.pools is None:
      return top_k_sample(self.log_w[self.row[request]], self.k, self.rng)
    d, l, p, _ = self.pools.shape
    pick = self.rng.integers(0, p, size=(request.size, l))
    return self.pools[self.row[request][:, None], np.arange(l)[None, :], pick]

  def __call__(self, plans, placement: Placement):
    step, server, request, position = _tokens(plans)
    ids = self.sample(request)                                          # [T, L, k]
    seconds, remote = step_costs(self.cost, placement, step, server, request, position, ids,
                                 len(plans))
    return seconds, remote, (step, server, ids)


def _rebudget(queues, old: np.ndarray, new: np.ndarray) -> tuple:
  """Queues whose unreserved KV moves by the change of each server's budget (a placement with
  more experts leaves less KV room; running requests keep their reservations, so a shrunken
  budget only holds admission back until they finish)."""
  return tuple(dataclasses.replace(q, kv_free=q.kv_free + int(b) - int(a))
               for q, a, b in zip(queues, old, new))


def _check(requests: Requests, cost: CostModel, options: sched.SchedulerOptions) -> None:
  n = cost.cluster.num_servers
  plen = requests.prompt_tokens
  for i in range(len(requests)):
    sched.check_request(i, int(plen[i]), int(requests.output_tokens[i]),
                        int(requests.server[i]), n, options, cost.model.max_seq_len)


def simulate(requests: Requests, placement: Placement, cost: CostModel, stats: RoutingStats,
             options: sched.SchedulerOptions, seed: int = 0, max_waiting: int = 100,
             controller: Controller | None = None, check_every_s: float = math.inf,
             bin_s: float = 30.0, pool: int = 0,
             kv_tokens: Sequence[int] | None = None) -> SimResult:
  """Serve ``requests`` to completion on the cost model (module docstring).

  Args:
    requests: the workload, sorted by arrival (domains must be in ``stats``).
    placement: the initial placement.
    cost: the deployment's cost model (model, cluster, calibration).
    stats: the routing statistics each request's tokens are sampled from, by domain.
    options: the scheduler's options; ``kv_tokens`` is replaced by each server's KV budget
      under the placement (:meth:`CostModel.kv_tokens`).
    seed: randomness of the routing samples.
    max_waiting: raise :class:`QueueDivergesError` when a server has more requests waiting.
    controller: migration hook (module docstring), called every ``check_every_s``.
    bin_s: resolution of the routing-count window the controller sees.
    pool: 0 samples every token exactly; ``P > 0`` draws ``P`` top-k sets per (domain, layer)
      once and lets tokens pick among them uniformly (an empirical version of the same
      distribution, for hundreds of servers where per-token draws dominate the run time).
    kv_tokens: ``[N]`` KV positions per server instead of the placement's leftover memory
      (for clusters whose memory model holds experts only); fixed across migrations.
  """
  n = cost.cluster.num_servers
  budget = (lambda p: np.asarray(kv_tokens)) if kv_tokens is not None else cost.kv_tokens
  options = dataclasses.replace(options, kv_tokens=tuple(int(x) for x in budget(placement)))
  _check(requests, cost, options)
  costing = _Costing(cost, stats, requests, seed, pool)
  plen, out_len = requests.prompt_tokens, requests.output_tokens
  queues = tuple(sched.ServerQueue.empty(options.kv_budget(s, n)) for s in range(n))
  window = Window(bin_s, (n, cost.model.n_moe_layers, cost.model.n_experts))
  first, records, steps, migrations = {}, [], [], []
  local = total = 0
  t, nxt, done, total_req = 0.0, 0, 0, len(requests)
  next_check = check_every_s
  mean_step = 0.05
  while done < total_req:
    while nxt < total_req and requests.arrival_s[nxt] <= t:
      s = int(requests.server[nxt])
      queues = queues[:s] + (sched.arrive(queues[s], sched.Waiting(
          nxt, int(plen[nxt]), int(out_len[nxt]))),) + queues[s + 1:]
      nxt += 1
    worst = max(range(n), key=lambda s: len(queues[s].waiting))
    if len(queues[worst].waiting) > max_waiting:
      raise QueueDivergesError(
          f"server {worst} has {len(queues[worst].waiting)} requests waiting at t={t:.0f} s "
          f"(limit {max_waiting}): the arrival rate exceeds what the cluster serves with this "
          f"placement, so the queue diverges; lower the arrival rate or add capacity.")
    if controller is not None and t >= next_check:
      new, stall = controller(t, window, placement)
      next_check += check_every_s * max(1, math.ceil((t - next_check) / check_every_s + 1e-12))
      if new is not None:
        migrations.append(Migration(t, float(stall), int(new.info.get("copies", 0)),
                                    str(new.info.get("note", ""))))
        queues = _rebudget(queues, budget(placement), budget(new))
        placement = new
        t += float(stall)
        continue
    event = min(requests.arrival_s[nxt] if nxt < total_req else math.inf, next_check)
    gap = (event - t) / max(mean_step, 1e-6)
    ahead = MAX_LOOKAHEAD if gap >= MAX_LOOKAHEAD else max(1, math.ceil(gap) + 1)
    batch = _plan_ahead(queues, options, ahead)
    if not batch.plans:
      if nxt >= total_req:
        raise sched.SchedulerError("internal: no step is possible but requests are unfinished; "
                                   "please report it.")
      t = max(t, float(min(requests.arrival_s[nxt], next_check)))
      continue
    seconds, remote, routed = costing(batch.plans, placement)
    start = t + np.concatenate([[0.0], np.cumsum(seconds)[:-1]])
    keep = max(1, int(np.searchsorted(start, event, side="left")))   # steps starting before it
    mean_step = float(np.mean(seconds[:keep]))
    step_of, server, ids = routed
    kept = step_of < keep
    window.add(start, step_of[kept], server[kept], ids[kept])
    window.add_steps(start[:keep])
    k_choices = ids.shape[1] * ids.shape[2]
    total += int(kept.sum()) * k_choices
    local += int(kept.sum()) * k_choices - int(remote[:keep].sum())
    act = cost.hardware.act
    for i in range(keep):
      plan, end = batch.plans[i], float(start[i] + seconds[i])
      steps.append(StepRecord(len(steps), float(start[i]), float(seconds[i]),
                              tuple(p.prefill_tokens for p in plan),
                              tuple(p.decode_tokens for p in plan),
                              int(2 * act * remote[i])))
      for _, r in batch.events[i].first_token:
        first[r] = end
      for s, r in batch.events[i].finished:
        records.append(RequestRecord(r, s, requests.domain[r], float(requests.arrival_s[r]),
                                     first[r], end, int(plen[r]), int(out_len[r])))
        done += 1
    queues = batch.states[keep - 1]
    t = float(start[keep - 1] + seconds[keep - 1])
  return SimResult(tuple(sorted(records, key=lambda x: x.request)), tuple(steps), local, total,
                   tuple(migrations), window)
