r"""Transfer schedules: the copies and drops that turn one placement into another, in rounds.

**Moves.** A move is one added replica ``(n, l, e)``: server ``n`` receives expert ``(l, e)``'s
weights (``W_e = model.expert_bytes`` bytes) from a current holder. Dropping a replica is free.
``bytes moved = moves * W_e``.

**Transfer time** (:func:`move_cost`). Copies run in rounds; drops (free) happen between
rounds. In a round every directed link carries at most ``max_concurrent_per_link`` copies; a
copy's source is the holder (at the round's start) that finishes it earliest given what that
sender already sends this round (the nearest holder, ties spread over holders). Servers send and
receive over full-duplex NICs, like the cost model's exchange (a server's sends are serialised
on its NIC)::

  send[m]    = max_{links m->n used} lat[m, n] + sum_{copies m->n} W_e / bw[m, n]
  receive[n] = max_{links m->n used} lat[m, n] + sum_{copies m->n} W_e / bw[m, n]
  round      = max( max_m send[m], max_n receive[n] ),   transfer time = sum of rounds.

(one copy alone: :meth:`~moe_edge.core.hardware.Hardware.copy_time`; a round:
:meth:`~moe_edge.core.hardware.Hardware.round_time`, the formulas' one home.)

A plan of :func:`plan_incremental` comes with its move sequence (:func:`move_sequence`): each
move adds one replica, possibly evicting one that is not the last copy of its expert at that
point of the sequence. Evictions then happen in the sequence's order, each copy after its own
eviction, copies in parallel as the links allow; this always makes progress and never exceeds a
server's memory. An arbitrary target (a full re-plan) has no sequence: a server drops replicas
it is to lose (only ones held elsewhere at that moment) when it needs room, the remaining drops
follow the last round, and when the remaining copies only form cycles of sole copies between
full servers (x only on a, y only on b, the target swaps them) one copy is *staged* in a
temporary buffer over the destination's memory (counted in ``MovePlan.staged``).

"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement
from moe_edge.migration.slots import MigrationError


@dataclasses.dataclass(frozen=True)
class MoveStep:
  """One step of a migration. ``kind`` is ``"copy"`` (``server`` receives expert
  ``(layer, expert)`` from ``source``; ``source = -1`` reads checkpointed weights from storage)
  or ``"drop"`` (``server`` frees it). Copies of one ``round`` run concurrently; their sources
  are holders at the round's start."""
  kind: str
  server: int
  layer: int
  expert: int
  source: int = -1
  round: int = -1


@dataclasses.dataclass(frozen=True)
class MovePlan:
  """How to go from one placement to another.

  Attributes:
    steps: the migration in time order (drops to make room, a round of copies, ..., final
      drops).
    round_seconds: ``[R]`` duration of each round of copies.
    expert_bytes: bytes of one expert.
    staged: copies that needed a temporary buffer slot over the destination's capacity.
  """
  steps: tuple[MoveStep, ...]
  round_seconds: tuple[float, ...]
  expert_bytes: int
  staged: int = 0

  @property
  def moves(self) -> int:
    """Added replicas (copies)."""
    return sum(s.kind == "copy" for s in self.steps)

  @property
  def drops(self) -> int:
    return sum(s.kind == "drop" for s in self.steps)

  @property
  def bytes(self) -> float:
    """Bytes of expert weights copied over the links."""
    return float(self.moves * self.expert_bytes)

  @property
  def seconds(self) -> float:
    """Transfer time: the sum of the rounds."""
    return float(sum(self.round_seconds))

  @property
  def rounds(self) -> int:
    return len(self.round_seconds)


def changed_experts(current: Placement | np.ndarray, target: Placement | np.ndarray) -> int:
  """Number of experts ``(l, e)`` whose set of hosting servers differs."""
  a = current.hosts if isinstance(current, Placement) else np.asarray(current, dtype=bool)
  b = target.hosts if isinstance(target, Placement) else np.asarray(target, dtype=bool)
  return int(np.any(a != b, axis=0).sum())


def _check_pair(current: np.ndarray, target: np.ndarray) -> None:
  if current.shape != target.shape:
    raise MigrationError(f"current and target placements differ in shape: {current.shape} vs "
                         f"{target.shape}.")
  for name, h in (("current", current), ("target", target)):
    if np.any(h.sum(axis=0) == 0):
      raise MigrationError(f"the {name} placement leaves an expert hosted nowhere.")


Triple = tuple[int, int, int]
Move = tuple[Triple, "Triple | None"]  # (added replica, replica evicted to make room, or None)


def move_sequence(placement: Placement) -> list[Move]:
  """The ordered moves of a :func:`plan_incremental` result: ``[(added, evicted or None)]``."""
  if "moves" not in placement.info or "evicted" not in placement.info:
    raise MigrationError("this placement carries no move sequence; only plan_incremental "
                         "results do (info['moves'] and info['evicted']).")
  return [(tuple(int(x) for x in a), None if v is None else tuple(int(x) for x in v))
          for a, v in zip(placement.info["moves"], placement.info["evicted"])]


def _assign_copies(adds: Sequence[Triple], h: np.ndarray, held: np.ndarray, cap: np.ndarray,
                   per_link: int, one: np.ndarray, w: float,
                   bw: np.ndarray) -> tuple[list[tuple[int, Triple]], list[Triple]]:
  """One round of copies, in the given priority: each destination within its capacity, each
  directed link at most ``per_link`` copies, the source among the holders ``h`` (the state at
  the round's start) that finishes earliest given what it already sends. Updates ``held``.
  Returns ``(chosen [(source, added)], not scheduled)``."""
  n_srv = h.shape[0]
  link_use = np.zeros((n_srv, n_srv), dtype=np.int64)
  send_t = np.zeros(n_srv)
  chosen, rest = [], []
  for a in adds:
    n, l, e = a
    holders = np.flatnonzero(h[:, l, e])
    ok = holders[link_use[holders, n] < per_link]
    if held[n] >= cap[n] or ok.size == 0:
      rest.append(a)
      continue
    m = int(ok[np.argmin(send_t[ok] + one[ok, n])])
    chosen.append((m, a))
    link_use[m, n] += 1
    send_t[m] += w / bw[m, n]
    held[n] += 1
  return chosen, rest


class _Scheduler:
  """The state of a schedule being built: hosts ``h`` (updated in place), replicas held per
  server, the steps and the rounds' durations (:meth:`Hardware.round_time`)."""

  def __init__(self, hosts: np.ndarray, cap: np.ndarray, per_link: int, hardware: Hardware):
    self.h, self.cap, self.c, self.hw = hosts, cap, per_link, hardware
    self.w = float(hardware.expert_bytes)
    self.one = hardware.copy_time(self.w)  # [N, N] seconds of one copy alone
    self.held = hosts.sum(axis=(1, 2))
    self.steps: list[MoveStep] = []
    self.rounds: list[float] = []

  def assign(self, adds: Sequence[Triple]) -> tuple[list[tuple[int, Triple]], list[Triple]]:
    return _assign_copies(adds, self.h, self.held, self.cap, self.c, self.one, self.w,
                          self.hw.bw)

  def drop(self, d: Triple) -> None:
    self.h[d] = False
    self.held[d[0]] -= 1
    self.steps.append(MoveStep("drop", *d, round=len(self.rounds)))

  def copy_round(self, chosen: list[tuple[int, Triple]]) -> None:
    n_srv = self.h.shape[0]
    per_link = np.zeros((n_srv, n_srv))
    for m, (n, l, e) in chosen:
      self.h[n, l, e] = True
      self.steps.append(MoveStep("copy", n, l, e, source=m, round=len(self.rounds)))
      per_link[m, n] += 1
    self.rounds.append(self.hw.round_time(per_link * self.w))

  def plan(self, staged: int = 0) -> MovePlan:
    return MovePlan(tuple(self.steps), tuple(self.rounds), int(self.hw.expert_bytes), staged)

  def follow(self, moves: list[Move]) -> MovePlan:
    """Evictions strictly in the planner's order, each copy after its own eviction."""
    h = self.h
    done = np.zeros(len(moves), dtype=bool)
    ptr = 0
    while not done.all():
      while ptr < len(moves):
        v = moves[ptr][1]
        if v is not None:
          if h[:, v[1], v[2]].sum() < 2:
            break
          self.drop(v)
        ptr += 1
      ready = [i for i in np.flatnonzero(~done) if i < ptr or moves[i][1] is None]
      chosen, _ = self.assign([moves[i][0] for i in ready])
      if not chosen:
        raise MigrationError("the move sequence cannot proceed (an eviction would drop a last "
                             "copy); it did not come from plan_incremental on this placement.")
      picked = {a for _, a in chosen}
      done[[i for i in ready if moves[i][0] in picked]] = True
      self.copy_round(chosen)
    return self.plan()

  def reach(self, goal: np.ndarray) -> MovePlan:
    """Copies by (server, layer, expert); drops of replicas to lose when room is needed."""
    h, n_srv = self.h, self.h.shape[0]
    adds = [tuple(int(x) for x in a) for a in np.argwhere(goal & ~h)]
    pending_drop = {tuple(int(x) for x in d) for d in np.argwhere(h & ~goal)}
    staged = 0
    while adds:
      # Drops that make room for this round's copies (only replicas held elsewhere right now).
      want = {}
      for n, _, _ in adds:
        want[n] = min(want.get(n, 0) + 1, (n_srv - 1) * self.c)
      for n, k in want.items():
        room = int(self.cap[n] - self.held[n])
        for d in sorted(d for d in pending_drop if d[0] == n):
          if room >= k:
            break
          if h[:, d[1], d[2]].sum() >= 2:
            self.drop(d)
            room += 1
            pending_drop.discard(d)
      chosen, rest = self.assign(adds)
      if not chosen:
        # Only cycles of sole copies between full servers remain: stage one copy over capacity.
        n, l, e = a = rest.pop(0)
        holders = np.flatnonzero(h[:, l, e])
        chosen.append((int(holders[np.argmin(self.one[holders, n])]), a))
        self.held[n] += 1
        staged += 1
      self.copy_round(chosen)
      adds = rest
    for d in sorted(pending_drop):
      self.drop(d)
    return self.plan(staged)


def move_cost(current: Placement, target: Placement, model: ModelConfig,
              cluster: ClusterConfig, capacity: np.ndarray | None = None,
              max_concurrent_per_link: int = 1, sequence: Sequence[Move] | None = None,
              hardware: Hardware | None = None) -> MovePlan:
  """Schedule the copies and drops that turn ``current`` into ``target`` (module docstring).

  Args:
    current, target: placements of one ``[N, L, E]`` shape.
    model, cluster: expert bytes, link bandwidth and latency.
    capacity: ``[N]`` experts each server can hold (default: ``cluster.expert_capacity``).
    max_concurrent_per_link: copies a directed link carries at once (per round).
    sequence: the planner's ordered moves (:func:`move_sequence`), if ``target`` came from
      :func:`plan_incremental`. Evictions then happen in the planner's order (each once it is
      not the last copy), each copy after its own eviction, copies in parallel as links allow;
      this never needs a staging buffer. Without it, copies go by (server, layer, expert) and a
      server drops replicas it is to lose (held elsewhere at that moment) when it needs room.
    hardware: the link and copy times (:meth:`Hardware.copy_time`, :meth:`Hardware.round_time`;
      default ``Hardware.build(model, cluster)``).
  Returns:
    A :class:`MovePlan`; ``hosted_at_every_moment(current.hosts, plan.steps)`` holds, and with
    ``capacity`` too unless ``plan.staged > 0``.
  """
  if max_concurrent_per_link < 1:
    raise MigrationError(f"max_concurrent_per_link must be >= 1, got {max_concurrent_per_link}.")
  h = np.array(current.hosts, dtype=bool)
  goal = np.asarray(target.hosts, dtype=bool)
  _check_pair(h, goal)
  n_srv = h.shape[0]
  cap = (cluster.expert_capacity(model) if capacity is None
         else np.asarray(capacity, dtype=np.int64))
  if cap.shape != (n_srv,):
    raise MigrationError(f"capacity must be [N] = [{n_srv}], got {cap.shape}.")
  if np.any(goal.sum(axis=(1, 2)) > cap):
    raise MigrationError("the target placement does not fit the servers' capacity.")
  hw = Hardware.build(model, cluster) if hardware is None else hardware
  sched = _Scheduler(h, cap, max_concurrent_per_link, hw)
  if sequence is None:
    return sched.reach(goal)
  moves = [(tuple(a), None if v is None else tuple(v)) for a, v in sequence]
  check = apply_steps(h, [MoveStep("copy", *a) for a, _ in moves] +
                      [MoveStep("drop", *v) for _, v in moves if v is not None])
  if not np.array_equal(check, goal):
    raise MigrationError("the move sequence does not turn the current placement into the "
                         "target; pass the sequence of the plan that made the target.")
  return sched.follow(moves)


def hosted_at_every_moment(initial_hosts: np.ndarray, steps: Sequence[MoveStep],
                           capacity: np.ndarray | None = None) -> bool:
  """True iff applying ``steps`` to ``initial_hosts [N, L, E]`` keeps every expert hosted at
  least once after every step, every copy reads from a server that held the expert when its
  round started (or from storage), nothing is dropped that is not held or copied onto a server
  that holds it, and (when ``capacity [N]`` is given) no server ever exceeds its capacity."""
  h = np.array(initial_hosts, dtype=bool)
  if np.any(h.sum(axis=0) == 0):
    return False
  round_start, cur_round = h.copy(), None
  for s in steps:
    if s.kind == "copy" and s.round != cur_round:
      round_start, cur_round = h.copy(), s.round
    key = (s.server, s.layer, s.expert)
    if s.kind == "copy":
      if h[key] or (s.source >= 0 and not round_start[s.source, s.layer, s.expert]):
        return False
      h[key] = True
      if capacity is not None and h[s.server].sum() > capacity[s.server]:
        return False
    elif s.kind == "drop":
      if not h[key]:
        return False
      h[key] = False
      if not h[:, s.layer, s.expert].any():
        return False
    else:
      raise MigrationError(f"unknown step kind {s.kind!r}; use 'copy' or 'drop'.")
  return True


def apply_steps(initial_hosts: np.ndarray, steps: Sequence[MoveStep]) -> np.ndarray:
  """``[N, L, E]`` hosts after ``steps`` (no checks; see :func:`hosted_at_every_moment`)."""
  h = np.array(initial_hosts, dtype=bool)
  for s in steps:
    h[s.server, s.layer, s.expert] = s.kind == "copy"
  return h
