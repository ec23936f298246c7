"""The serving loop shared by the engine and the simulator.

Requests join their server's queue at their arrival time on a clock; each iteration plans a
cluster step with :func:`moe_edge.serving.scheduler.plan_step`, hands it to an *executor*
(the engine runs it on the device mesh, the simulator costs it), advances the clock by the
step and the queues by :func:`~moe_edge.serving.scheduler.advance`, and records the step and
every request's first-token and finish times (a token exists at the end of the step that
produced it). When no server has anything to feed, the clock jumps (virtual) or sleeps (wall)
to the next arrival.

Clocks: :class:`VirtualClock` advances by the executor's modelled step time;
:class:`WallClock` is real time (the step's duration is what it measured).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence

from moe_edge.serving import scheduler as sched
from moe_edge.serving.metrics import RequestRecord, StepRecord
from moe_edge.workload.requests import Requests


class QueueDivergesError(sched.SchedulerError):
  """The arrival rate exceeds what the cluster serves: a queue keeps growing."""


@dataclasses.dataclass(frozen=True)
class StepOutcome:
  """What an executor reports: the step's modelled seconds (used by a virtual clock) and the
  bytes that crossed servers."""
  seconds: float
  cross_bytes: int


class Executor(Protocol):
  def __call__(self, index: int, steps: tuple[sched.ServerStep, ...]) -> StepOutcome: ...


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
             between_steps: Callable[[int, float], None] | None = None) -> LoopResult:
  """Serve ``requests`` to completion (module docstring).

  Args:
    requests: the workload (sorted by arrival).
    num_servers: ``N``.
    options: scheduler options.
    context: the model's context length (requests must fit it).
    executor: runs or costs one planned step.
    clock: :class:`VirtualClock` or :class:`WallClock`.
    max_waiting: raise :class:`QueueDivergesError` when a server has more waiting requests
      (the offered load exceeds the cluster; default: no limit).
    between_steps: called with ``(steps done, now)`` before each step (migration, failures).
  """
  check_requests(requests, num_servers, options, context)
  plen = requests.prompt_tokens
  queues = tuple(sched.ServerQueue.empty(options.kv_budget(n, num_servers))
                 for n in range(num_servers))
  first: dict[int, float] = {}
  records, steps = [], []
  nxt, total, done = 0, len(requests), 0
  while done < total:
    now = clock.now()
    while nxt < total and requests.arrival_s[nxt] <= now:
      n = int(requests.server[nxt])
      queues = queues[:n] + (sched.arrive(queues[n], sched.Waiting(
          nxt, int(plen[nxt]), int(requests.output_tokens[nxt]))),) + queues[n + 1:]
      nxt += 1
    if max_waiting is not None:
      worst = max(range(num_servers), key=lambda n: len(queues[n].waiting))
      if len(queues[worst].waiting) > max_waiting:
        raise QueueDivergesError(
            f"server {worst} has {len(queues[worst].waiting)} waiting requests at "
            f"t={now:.1f} s (limit {max_waiting}): the arrival rate exceeds what the cluster "
            f"serves, so the queue diverges; lower the rate or add capacity.")
    plan = sched.plan_step(queues, options)
    if sched.idle(plan):
      if nxt >= total:
        raise sched.SchedulerError("internal: no step is possible but requests are unfinished;"
                                   " please report it.")
      clock.wait_until(float(requests.arrival_s[nxt]))
      continue
    if between_steps is not None:
      between_steps(len(steps), now)
      now = clock.now()
    outcome = executor(len(steps), plan)
    clock.advance(outcome.seconds)
    end = clock.now()
    steps.append(StepRecord(len(steps), now, end - now,
                            tuple(s.prefill_tokens for s in plan),
                            tuple(s.decode_tokens for s in plan), int(outcome.cross_bytes)))
    queues, events = sched.advance(queues, plan)
    for _, r in events.first_token:
      first[r] = end
    for n, r in events.finished:
      records.append(RequestRecord(r, n, requests.domain[r], float(requests.arrival_s[r]),
                                   first[r], end, int(plen[r]), int(requests.output_tokens[r])))
      done += 1
  return LoopResult(tuple(sorted(records, key=lambda x: x.request)), tuple(steps))
