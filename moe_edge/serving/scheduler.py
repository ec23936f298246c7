"""The step planner of serving: a pure function from queue state to the next cluster step.

Free of JAX and of time: the engine (real execution) and the simulator (cost-model times) run
this same planner, so they form the same batches from the same queue states.

Per server (continuous batching, every server independently):

1. **Admission.** Waiting requests are considered in policy order (``"fifo"``: arrival order;
   ``"shortest_first"``: fewest prompt + output tokens first, ties by arrival). A request is
   admitted when a batch slot is free and the server's unreserved KV memory holds its prompt
   plus its *maximum* output; it then keeps its slot and its reservation until it finishes.
   The first request that does not fit stops admission for this step (no overtaking: a large
   request at the head is not starved). There is **no preemption**: a running request is never
   paused or evicted, so the reservation is what makes running out of KV memory impossible.
2. **Token budget.** At most ``token_budget`` tokens per server and step. Decodes go first: one
   token for every running request whose prompt is done (``token_budget >= max_batch``, so
   they always fit). The rest of the budget goes to prompt chunks of running requests, in
   admission order, at most ``prefill_chunk`` positions of one request per step (chunked
   prefill: a long prompt is spread over several steps, alongside other requests' decodes).

A request of ``P`` prompt and ``O`` output tokens: its prompt is fed over one or more steps; the
step that feeds its last prompt token yields its first output token; each of the next ``O - 1``
steps feeds its latest token and yields one more. It holds cache positions ``0 .. P + O - 2``.

Functions: :func:`arrive` (queue a request), :func:`plan_step` (the next step),
:func:`advance` (the state after that step ran).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

POLICIES = ("fifo", "shortest_first")


class SchedulerError(ValueError):
  """Scheduler options or a request do not fit together."""


@dataclasses.dataclass(frozen=True)
class SchedulerOptions:
  """How every server batches.

  Attributes:
    max_batch: running requests per server (the engine's KV-cache slots).
    token_budget: tokens per server per step (decodes plus prompt chunks), ``>= max_batch``.
    prefill_chunk: prompt positions of one request per step.
    kv_tokens: KV-cache positions per server available for reservations (one value for every
      server, or one per server).
    policy: admission order, one of :data:`POLICIES`.
  """
  max_batch: int = 4
  token_budget: int = 128
  prefill_chunk: int = 64
  kv_tokens: int | tuple[int, ...] = 1024
  policy: str = "fifo"

  def __post_init__(self):
    for name in ("max_batch", "token_budget", "prefill_chunk"):
      v = getattr(self, name)
      if int(v) != v or v < 1:
        raise SchedulerError(f"{name} must be a positive integer, got {v!r}.")
    if self.token_budget < self.max_batch:
      raise SchedulerError(f"token_budget ({self.token_budget}) must be >= max_batch "
                           f"({self.max_batch}) so every running request can decode each step; "
                           f"raise token_budget or lower max_batch.")
    kv = (self.kv_tokens,) if isinstance(self.kv_tokens, int) else tuple(self.kv_tokens)
    if not kv or any(int(v) != v or v < 1 for v in kv):
      raise SchedulerError(f"kv_tokens must be positive integers, got {self.kv_tokens!r}.")
    if self.policy not in POLICIES:
      raise SchedulerError(f"unknown policy {self.policy!r}; use one of {POLICIES}.")

  def kv_budget(self, server: int, num_servers: int) -> int:
    """KV positions server ``server`` of ``num_servers`` can reserve."""
    if isinstance(self.kv_tokens, int):
      return int(self.kv_tokens)
    if len(self.kv_tokens) != num_servers:
      raise SchedulerError(f"kv_tokens has {len(self.kv_tokens)} entries for {num_servers} "
                           f"servers; give one value or one per server.")
    return int(self.kv_tokens[server])


@dataclasses.dataclass(frozen=True)
class Waiting:
  """A queued request (``request``: its index in the workload)."""
  request: int
  prompt_tokens: int
  max_output: int

  @property
  def reserve(self) -> int:
    """KV positions reserved at admission: prompt plus maximum output."""
    return self.prompt_tokens + self.max_output


@dataclasses.dataclass(frozen=True)
class Running:
  """An admitted request in batch slot ``slot``: ``prefilled`` prompt positions fed,
  ``generated`` output tokens produced."""
  request: int
  slot: int
  prompt_tokens: int
  max_output: int
  prefilled: int = 0
  generated: int = 0

  @property
  def decoding(self) -> bool:
    return self.prefilled == self.prompt_tokens


@dataclasses.dataclass(frozen=True)
class ServerQueue:
  """One server's state: ``waiting`` (arrival order), ``running`` (admission order) and its
  unreserved KV positions ``kv_free``."""
  waiting: tuple[Waiting, ...]
  running: tuple[Running, ...]
  kv_free: int

  @classmethod
  def empty(cls, kv_tokens: int) -> "ServerQueue":
    return cls((), (), int(kv_tokens))


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Prompt positions ``start .. start + length - 1`` of ``request`` (in ``slot``) this step."""
  request: int
  slot: int
  start: int
  length: int


@dataclasses.dataclass(frozen=True)
class Decode:
  """One decode of ``request`` (in ``slot``): feeds the token at ``position``."""
  request: int
  slot: int
  position: int


@dataclasses.dataclass(frozen=True)
class ServerStep:
  """What one server does in a step: requests admitted (``(request, slot)``), prompt chunks
  and decodes."""
  admit: tuple[tuple[int, int], ...]
  prefill: tuple[Chunk, ...]
  decode: tuple[Decode, ...]

  @property
  def prefill_tokens(self) -> int:
    return sum(c.length for c in self.prefill)

  @property
  def decode_tokens(self) -> int:
    return len(self.decode)

  @property
  def tokens(self) -> int:
    return self.prefill_tokens + self.decode_tokens


def check_request(request: int, prompt_tokens: int, max_output: int, server: int,
                  num_servers: int, options: SchedulerOptions, context: int) -> None:
  """Raise :class:`SchedulerError` naming ``request`` unless it can ever be served: a real
  server, a prompt and an output of at least one token, prompt plus output within the model's
  ``context`` and within the server's KV budget."""
  if not 0 <= server < num_servers:
    raise SchedulerError(f"request {request} is for server {server}, but the cluster has "
                         f"servers 0..{num_servers - 1}; fix its server.")
  if prompt_tokens < 1:
    raise SchedulerError(f"request {request} has an empty prompt; give it at least one token.")
  if max_output < 1:
    raise SchedulerError(f"request {request} asks for {max_output} output tokens; ask for at "
                         f"least 1.")
  if prompt_tokens + max_output > context:
    raise SchedulerError(f"request {request}: prompt ({prompt_tokens}) + output ({max_output}) "
                         f"= {prompt_tokens + max_output} tokens exceeds the model's context of "
                         f"{context}; shorten the prompt or the output (nothing is truncated).")
  budget = options.kv_budget(server, num_servers)
  if prompt_tokens + max_output > budget:
    raise SchedulerError(f"request {request} needs {prompt_tokens + max_output} KV positions but "
                         f"server {server}'s KV budget is {budget}; raise kv_tokens to at least "
                         f"{prompt_tokens + max_output} or shorten the request.")


def arrive(queue: ServerQueue, request: Waiting) -> ServerQueue:
  """``queue`` with ``request`` appended to its waiting list."""
  return dataclasses.replace(queue, waiting=queue.waiting + (request,))


def _admission_order(waiting: tuple[Waiting, ...], policy: str) -> list[int]:
  idx = list(range(len(waiting)))
  if policy == "shortest_first":
    idx.sort(key=lambda i: (waiting[i].reserve, i))
  return idx


def _plan_server(queue: ServerQueue, options: SchedulerOptions) -> ServerStep:
  used = {r.slot for r in queue.running}
  free_slots = [s for s in range(options.max_batch) if s not in used]
  kv_free = queue.kv_free
  admit, admitted = [], []
  for i in _admission_order(queue.waiting, options.policy):
    w = queue.waiting[i]
    if not free_slots or w.reserve > kv_free:
      break
    slot = free_slots.pop(0)
    kv_free -= w.reserve
    admit.append((w.request, slot))
    admitted.append(Running(w.request, slot, w.prompt_tokens, w.max_output))
  budget = options.token_budget
  decode = []
  for r in queue.running:
    if r.decoding:
      decode.append(Decode(r.request, r.slot, r.prompt_tokens + r.generated - 1))
  budget -= len(decode)
  prefill = []
  for r in queue.running + tuple(admitted):
    if budget == 0:
      break
    if not r.decoding:
      n = min(r.prompt_tokens - r.prefilled, options.prefill_chunk, budget)
      prefill.append(Chunk(r.request, r.slot, r.prefilled, n))
      budget -= n
  return ServerStep(tuple(admit), tuple(prefill), tuple(decode))


def plan_step(queues: Sequence[ServerQueue], options: SchedulerOptions
              ) -> tuple[ServerStep, ...]:
  """The next cluster step: one :class:`ServerStep` per server (module docstring)."""
  return tuple(_plan_server(q, options) for q in queues)


@dataclasses.dataclass(frozen=True)
class StepEvents:
  """What a step completed: requests that produced their first token, and requests finished
  (both as ``(server, request)``)."""
  first_token: tuple[tuple[int, int], ...]
  finished: tuple[tuple[int, int], ...]


def _advance_server(queue: ServerQueue, step: ServerStep, server: int,
                    first: list, finished: list) -> ServerQueue:
  if not step.admit and not step.prefill and not step.decode:
    return queue
  running = list(queue.running)
  waiting = queue.waiting
  kv_free = queue.kv_free
  if step.admit:
    admitted = dict(step.admit)
    by_req = {w.request: w for w in queue.waiting if w.request in admitted}
    waiting = tuple(w for w in queue.waiting if w.request not in admitted)
    for req, slot in step.admit:
      w = by_req[req]
      running.append(Running(req, slot, w.prompt_tokens, w.max_output))
      kv_free -= w.reserve
  fed = {c.request: c.length for c in step.prefill}
  decoded = {d.request for d in step.decode}
  out = []
  for r in running:
    if r.request in fed:
      pre = r.prefilled + fed[r.request]
      gen = 1 if pre == r.prompt_tokens else 0
      if gen:
        first.append((server, r.request))
      r = Running(r.request, r.slot, r.prompt_tokens, r.max_output, pre, gen)
    elif r.request in decoded:
      r = Running(r.request, r.slot, r.prompt_tokens, r.max_output, r.prefilled,
                  r.generated + 1)
    if r.generated == r.max_output:
      finished.append((server, r.request))
      kv_free += r.prompt_tokens + r.max_output
    else:
      out.append(r)
  return ServerQueue(waiting, tuple(out), kv_free)


def advance(queues: Sequence[ServerQueue], steps: Sequence[ServerStep]
            ) -> tuple[tuple[ServerQueue, ...], StepEvents]:
  """The queue states after ``steps`` (from :func:`plan_step` on ``queues``) ran, and the
  step's events."""
  first, finished = [], []
  new = tuple(_advance_server(q, s, n, first, finished)
              for n, (q, s) in enumerate(zip(queues, steps)))
  return new, StepEvents(tuple(first), tuple(finished))


def idle(steps: Sequence[ServerStep]) -> bool:
  """True when the planned step feeds no token on any server."""
  return all(s.tokens == 0 for s in steps)
