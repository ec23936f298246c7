"""The serving loop shared by the engine and the simulator.

Requests join their server's queue at their arrival time on a clock; each iteration plans
cluster steps with :func:`moe_edge.serving.scheduler.plan_step`, hands them to an *executor*
(the engine runs them on the device mesh, the simulator costs them), advances the clock by the
steps and the queues by :func:`~moe_edge.serving.scheduler.advance`, and records each step and
every request's first-token and finish times (a token exists at the end of the step that
produced it). When no server has anything to feed, the clock jumps (virtual) or sleeps (wall)
to the next event.

Planning ahead (``lookahead > 1``, virtual clock only; the engine plans one step at a time):
the plan of a step depends only on the queue state, which depends on time only through
arrivals and controller checks (*events*), so up to ``lookahead`` steps are planned from the
current state, costed in one executor call, and the steps that would start at or after the next
event are dropped (:meth:`Executor.commit` is told how many were kept) and re-planned with it.
The steps and batches are those of planning one step at a time; the executor's per-step costs
are the same; only the start times' float rounding differs (``t + cumsum`` over a batch).

Control (migration, failures): ``between_steps(steps done, now)`` runs before every step (the
engine's live migration); ``controller(now)`` runs every ``check_every_s`` seconds of the clock
and may stall serving (stop-the-world: no step runs meanwhile) and move each server's
unreserved KV budget (a placement with more experts leaves less KV room; running requests keep
their reservations).

Clocks: :class:`VirtualClock` advances by the executor's modelled step time;
:class:`WallClock` is real time (the step's duration is what it measured).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from moe_edge.serving import scheduler as sched
from moe_edge.serving.metrics import RequestRecord, StepRecord
from moe_edge.workload.requests import Requests


class QueueDivergesError(sched.SchedulerError):
  """The arrival rate exceeds what the cluster serves: a queue keeps growing."""


@dataclasses.dataclass(frozen=True)
class StepOutcome:
  """What an executor reports for the steps it was given: each step's modelled seconds (used
  by a virtual clock) and the bytes that crossed servers."""
  seconds: Sequence[float]
  cross_bytes: Sequence[int]


class Executor(Protocol):
  def __call__(self, index: int, plans: Sequence[tuple[sched.ServerStep, ...]]) -> StepOutcome:
    """Run or cost ``plans`` (steps ``index, index + 1, ...``)."""

  def commit(self, kept: int, start_s: Sequence[float]) -> None:
    """The first ``kept`` of the last call's steps happened, starting at ``start_s``."""


@dataclasses.dataclass(frozen=True)
class Control:
  """What a controller decided: stall serving ``stall_s`` seconds; add ``kv_change[n]`` KV
  positions to server ``n``'s unreserved budget (``None``: unchanged)."""
  stall_s: float = 0.0
  kv_change: Sequence[int] | None = None


Controller = Callable[[float], "Control | None"]


class VirtualClock:
  """Time that moves only when told: by each step's modelled seconds, or to an arrival."""

  def __init__(self):
    self._t = 0.0

  def now(self) -> float:
    return self._t

  def advance(self, seconds: float) -> None:
    self._t += float(seconds)

  def wait_until(self, t: float) -> None:
    self._t = max(self._t, float(t))


class WallClock:
  """Real time since construction; a step's duration is what passed while it ran."""

  def __init__(self):
    self._t0 = time.perf_counter()

  def now(self) -> float:
    return time.perf_counter() - self._t0

  def advance(self, seconds: float) -> None:
    del seconds  # real time has already passed

  def wait_until(self, t: float) -> None:
    delay = t - self.now()
    if delay > 0:
      time.sleep(delay)


@dataclasses.dataclass(frozen=True)
class LoopResult:
  requests: tuple[RequestRecord, ...]
  steps: tuple[StepRecord, ...]


def check_requests(requests: Requests, num_servers: int, options: sched.SchedulerOptions,
                   context: int) -> None:
  """Every request must be servable (:func:`moe_edge.serving.scheduler.check_request`)."""
  plen = requests.prompt_tokens
  for i in range(len(requests)):
    sched.check_request(i, int(plen[i]), int(requests.output_tokens[i]),
                        int(requests.server[i]), num_servers, options, context)


def run_loop(requests: Requests, num_servers: int, options: sched.SchedulerOptions,
             context: int, executor: Executor, clock, max_waiting: int | None = None,
             between_steps: Callable[[int, float], None] | None = None,
             controller: Controller | None = None, check_every_s: float = math.inf,
             lookahead: int = 1) -> LoopResult:
  """Serve ``requests`` to completion (module docstring).

  Args:
    requests: the workload (sorted by arrival).
    num_servers: ``N``.
    options: scheduler options.
    context: the model's context length (requests must fit it).
    executor: runs or costs planned steps (:class:`Executor`; a plain callable is called
      with one step at a time).
    clock: :class:`VirtualClock` or :class:`WallClock`.
    max_waiting: raise :class:`QueueDivergesError` when a server has more waiting requests
      (the offered load exceeds the cluster; default: no limit).
    between_steps: called with ``(steps done, now)`` before each step (migration, failures).
    controller: called every ``check_every_s`` seconds (:class:`Control`).
    lookahead: steps planned and costed at once (virtual clock only).
  """
  check_requests(requests, num_servers, options, context)
  if lookahead > 1 and (between_steps is not None or not isinstance(clock, VirtualClock)):
    raise sched.SchedulerError("planning ahead needs the virtual clock and no between_steps "
                               "hook; use lookahead=1.")
  run = _Run(requests, num_servers, options, executor, clock)
  next_check, mean_step = check_every_s, 0.05
  while run.done < len(requests):
    now = clock.now()
    run.arrive(now)
    run.check_divergence(now, max_waiting)
    if controller is not None and now >= next_check:
      decision = controller(now)
      next_check += check_every_s * max(1, math.ceil((now - next_check) / check_every_s
                                                     + 1e-12))
      if decision is not None:
        run.rebudget(decision.kv_change)
        clock.wait_until(now + float(decision.stall_s))
        continue
    event = min(run.next_arrival(), next_check)
    gap = (event - now) / max(mean_step, 1e-6)
    ahead = 1 if lookahead == 1 else (
        lookahead if gap >= lookahead else max(1, math.ceil(gap) + 1))
    batch = _plan_ahead(run.queues, options, ahead)
    if not batch.plans:
      if run.next_arrival() == math.inf:
        raise sched.SchedulerError("internal: no step is possible but requests are unfinished;"
                                   " please report it.")
      clock.wait_until(event)
      continue
    if between_steps is not None:
      between_steps(len(run.steps), now)
      now = clock.now()
    mean_step = run.step_batch(now, event, batch)
  return LoopResult(tuple(sorted(run.records, key=lambda x: x.request)), tuple(run.steps))


@dataclasses.dataclass
class _Batch:
  """Steps planned ahead from one queue state: the plans, the states after each, events."""
  plans: list
  states: list
  events: list


def _plan_ahead(queues, options: sched.SchedulerOptions, limit: int) -> _Batch:
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


class _Run:
  """The loop's mutable state: queues, the next arrival, records."""

  def __init__(self, requests: Requests, num_servers: int, options: sched.SchedulerOptions,
               executor, clock):
    self.requests, self.n, self.executor, self.clock = requests, num_servers, executor, clock
    self.plen = requests.prompt_tokens
    self.queues = tuple(sched.ServerQueue.empty(options.kv_budget(n, num_servers))
                        for n in range(num_servers))
    self.first: dict[int, float] = {}
    self.records: list[RequestRecord] = []
    self.steps: list[StepRecord] = []
    self.nxt = self.done = 0

  def next_arrival(self) -> float:
    r = self.requests
    return float(r.arrival_s[self.nxt]) if self.nxt < len(r) else math.inf

  def arrive(self, now: float) -> None:
    r = self.requests
    while self.nxt < len(r) and r.arrival_s[self.nxt] <= now:
      n = int(r.server[self.nxt])
      self.queues = self.queues[:n] + (sched.arrive(self.queues[n], sched.Waiting(
          self.nxt, int(self.plen[self.nxt]), int(r.output_tokens[self.nxt]))),) + \
          self.queues[n + 1:]
      self.nxt += 1

  def check_divergence(self, now: float, max_waiting: int | None) -> None:
    if max_waiting is None:
      return
    worst = max(range(self.n), key=lambda n: len(self.queues[n].waiting))
    if len(self.queues[worst].waiting) > max_waiting:
      raise QueueDivergesError(
          f"server {worst} has {len(self.queues[worst].waiting)} waiting requests at "
          f"t={now:.1f} s (limit {max_waiting}): the arrival rate exceeds what the cluster "
          f"serves, so the queue diverges; lower the rate or add capacity.")

  def rebudget(self, change: Sequence[int] | None) -> None:
    if change is not None:
      self.queues = tuple(dataclasses.replace(q, kv_free=q.kv_free + int(c))
                          for q, c in zip(self.queues, change))

  def step_batch(self, now: float, event: float, batch: _Batch) -> float:
    """Run the batch, keep the steps that start before ``event``; returns their mean time."""
    if hasattr(self.executor, "commit"):
      outcome = self.executor(len(self.steps), batch.plans)
    else:  # a plain callable: one step
      outcome = self.executor(len(self.steps), batch.plans[0])
      outcome = StepOutcome([outcome.seconds], [outcome.cross_bytes])
    seconds = np.asarray(outcome.seconds, np.float64)
    if isinstance(self.clock, VirtualClock):
      start = now + np.concatenate([[0.0], np.cumsum(seconds)[:-1]])
      keep = max(1, int(np.searchsorted(start, event, side="left")))
      self.clock.wait_until(float(start[keep - 1] + seconds[keep - 1]))
    else:  # one step; its duration is what the clock measured
      self.clock.advance(float(seconds[0]))
      start, seconds, keep = np.array([now]), np.array([self.clock.now() - now]), 1
    if hasattr(self.executor, "commit"):
      self.executor.commit(keep, start[:keep])
    r = self.requests
    for i in range(keep):
      plan, end = batch.plans[i], float(start[i] + seconds[i])
      self.steps.append(StepRecord(len(self.steps), float(start[i]), float(seconds[i]),
                                   tuple(p.prefill_tokens for p in plan),
                                   tuple(p.decode_tokens for p in plan),
                                   int(outcome.cross_bytes[i])))
      for _, q in batch.events[i].first_token:
        self.first[q] = end
      for n, q in batch.events[i].finished:
        self.records.append(RequestRecord(q, n, r.domain[q], float(r.arrival_s[q]),
                                          self.first[q], end, int(self.plen[q]),
                                          int(r.output_tokens[q])))
        self.done += 1
    self.queues = batch.states[keep - 1]
    return float(np.mean(seconds[:keep]))
