r"""Runtime migration: move expert replicas when the workload drifts, and survive a lost server.

A running cluster serves with a placement planned for yesterday's activation frequencies. When
the online statistics (:mod:`moe_edge.workload.online_stats`) say the workload moved, this module
decides *whether* to move experts, plans a new placement that stays *close* to the current one,
and schedules the weight copies so that every expert stays reachable at every moment.

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

A plan of :func:`plan_incremental` comes with its move sequence (:func:`move_sequence`): each
move adds one replica, possibly evicting one that is not the last copy of its expert at that
point of the sequence. Evictions then happen in the sequence's order, each copy after its own
eviction, copies in parallel as the links allow; this always makes progress and never exceeds a
server's memory. An arbitrary target (a full re-plan) has no sequence: a server drops replicas
it is to lose (only ones held elsewhere at that moment) when it needs room, the remaining drops
follow the last round, and when the remaining copies only form cycles of sole copies between
full servers (x only on a, y only on b, the target swaps them) one copy is *staged* in a
temporary buffer over the destination's memory (counted in ``MovePlan.staged``).

**Trigger** (:func:`should_migrate`). With ``t_cur`` and ``t_new`` the expected step latency
(:func:`moe_edge.cost.model.expected_cost` on the current statistics) of the current and the
candidate placement, ``S`` steps per interval and ``tau`` the transfer time::

  gain_s = (t_cur - t_new) * max(0, S - tau / t_cur)   # the new placement serves once copied
  cost_s = interference * tau                           # serving time lost while copying
  migrate  iff  moves > 0  and  gain_s > safety * cost_s

``interference`` is the fraction of serving time lost while weights are in flight (copies share
the links with the dispatch). The default 1.0 is the conservative bound "serving stalls for the
whole transfer"; the true value is smaller because copies run beside serving. The saving
``t_cur - t_new`` is best estimated on statistics the candidate was not fitted to
(:func:`cross_validated_saving`): fitted and scored on one noisy window, a plan always looks
better than it is.

**How much to move** (:func:`choose_prefix`). A greedy plan lists its moves best first, so its
first ``k`` moves are the plan of budget ``k`` (:func:`plan_prefix`). The trigger judges every
prefix (``k = step, 2 step, ..., all``; savings held out per prefix by
:func:`cross_validated_savings`) and makes the approved one with the largest net gain
``gain_s - safety * cost_s``: a budget is an upper bound, not a quota, and copies whose saving
does not pay for their transfer are not made.

**Incremental planning** (:func:`plan_incremental`). Greedy moves on the current placement:
add replica ``(n, l, e)`` (into free room on ``n``, or evicting the least valuable replica on
``n`` that is not the last copy of its expert), or *relocate* (two copies: a full server hands one
of its sole copies to another server and the freed slot takes the add), best gain per copy
first, until the move or byte budget is spent or nothing gains. Candidates are ranked by a fast
*proxy*, the change of the traffic-weighted link time to the nearest replica,

  ``R = sum_{n,l,e} x[n,l,e] * min_{m : hosts[m,l,e]} link[n, m]``,  ``x = tokens * freq``,
  ``link`` = :func:`~moe_edge.placement.problem.link_time_per_token`

(adding a replica lowers it for every server that gets closer; evicting raises it for every
server that loses its nearest replica), and each accepted move must lower the exact *score*:
by default the placement objective DanceMoE minimises
(:func:`moe_edge.placement.objective.objective`), so the incremental and the full re-plan pursue
one goal. Replicas added by a plan are never evicted by it and evicted ones never re-added.
Unchanged experts keep their slots (:func:`assign_slots_stable`), and
:func:`hosted_at_every_moment` checks any step sequence. :func:`min_copies_for_coverage` bounds
from below the copies *any* plan needs to reach a coverage, to tell a weak planner from an
impossible target.

**Failure** (:func:`fail_server`). A failed server's tokens stop and its replicas vanish. Tokens
of experts held elsewhere fall back at once to the remaining replicas (route recomputed without
it); experts it held alone are unreachable until re-loaded from checkpointed weights (storage,
not links) onto surviving servers with room (evicting low-value replicas that are not last
copies if needed). Recovery time = the slowest server's ``loads * W_e / storage_bandwidth``.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.placement.problem import (Placement, PlacementError, PlacementProblem,
                                        link_time_per_token, slot_table)
from moe_edge.placement.routing import nearest_replica_route_fast as nearest_replica_route

Score = Callable[[PlacementProblem, Placement], float]
DEFAULT_STORAGE_BANDWIDTH = 2e9  # bytes/s: an NVMe SSD read (documented assumption; override)


class MigrationError(PlacementError):
  """A migration request is malformed or cannot be carried out."""


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------
def assign_slots_stable(old_slot_expert: np.ndarray, new_hosts: np.ndarray,
                        num_slots: int | None = None) -> np.ndarray:
  """Slot table for ``new_hosts`` in which every kept expert stays in its old slot.

  Args:
    old_slot_expert: ``[N, L, S_old]`` int32, the current slot table (``-1`` empty).
    new_hosts: ``[N, L, E]`` bool, the new placement.
    num_slots: slots per layer of the result; default ``max(S_old, needed)`` (never shrinks,
      so the dispatch keeps its compiled shapes). Raises if smaller than needed.
  Returns:
    ``[N, L, S]`` int32: kept experts (in both old and new hosts) at their old slot index; new
    experts, in increasing id, in the lowest free slots (freed by dropped experts or empty).
  """
  old = np.asarray(old_slot_expert)
  hosts = np.asarray(new_hosts, dtype=bool)
  n_srv, n_lay, n_exp = hosts.shape
  if old.ndim != 3 or old.shape[:2] != (n_srv, n_lay):
    raise MigrationError(f"old slot table must be [N, L, S] with [N, L] = [{n_srv}, {n_lay}], "
                         f"got {old.shape}.")
  s_old = old.shape[2]
  kept = np.zeros(old.shape, dtype=bool)
  valid = old >= 0
  nn, ll, ss = np.nonzero(valid)
  kept[nn, ll, ss] = hosts[nn, ll, old[nn, ll, ss]]
  count = hosts.sum(axis=2)
  last_kept = np.where(kept, np.arange(s_old)[None, None, :] + 1, 0).max(axis=2)
  # New experts fill free slots from the left; a (server, layer) needs count slots unless a kept
  # expert sits further right.
  need = int(np.maximum(count, last_kept).max()) if hosts.size else 0
  s = max(s_old, need) if num_slots is None else int(num_slots)
  if s < need:
    raise MigrationError(f"num_slots={s} is too small: keeping experts in their slots needs "
                         f"{need} slots per layer.")
  out = np.full((n_srv, n_lay, s), -1, dtype=np.int32)
  out[:, :, :s_old] = np.where(kept, old, -1)
  in_old = np.zeros(hosts.shape, dtype=bool)
  in_old[nn, ll, old[nn, ll, ss]] = kept[nn, ll, ss]
  for n in range(n_srv):
    for l in range(n_lay):
      new = np.flatnonzero(hosts[n, l] & ~in_old[n, l])
      if new.size:
        free = np.flatnonzero(out[n, l] < 0)[:new.size]
        out[n, l, free] = new
  return out


def placement_with_slots(hosts: np.ndarray, old: Placement, model: ModelConfig,
                         cluster: ClusterConfig, traffic: np.ndarray | None = None,
                         method: str = "", info: dict | None = None) -> Placement:
  """A validated :class:`Placement` for ``hosts`` whose slot table keeps ``old``'s kept experts
  in place (:func:`assign_slots_stable`) and whose route is the default nearest-replica route."""
  hosts = np.asarray(hosts, dtype=bool)
  route = nearest_replica_route(hosts, model, cluster, traffic)
  p = Placement(hosts, route, assign_slots_stable(old.slot_expert, hosts), method,
                dict(info or {}))
  p.validate()
  return p


# --------------------------------------------------------------------------------------------
# Moves and their schedule
# --------------------------------------------------------------------------------------------
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


def _round_time(copies: list[tuple[int, int]], expert_bytes: float, bw: np.ndarray,
                lat: np.ndarray) -> float:
  """Duration of one round of ``(source, destination)`` copies (module docstring)."""
  n = bw.shape[0]
  per_link = np.zeros((n, n))
  for m, d in copies:
    per_link[m, d] += 1
  xfer = per_link * expert_bytes / bw  # bw diagonal is inf: no self-copies anyway
  used = per_link > 0
  send = xfer.sum(axis=1) + np.max(np.where(used, lat, 0.0), axis=1)
  recv = xfer.sum(axis=0) + np.max(np.where(used, lat, 0.0), axis=0)
  return float(max(send.max(), recv.max()))


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


def move_cost(current: Placement, target: Placement, model: ModelConfig,
              cluster: ClusterConfig, capacity: np.ndarray | None = None,
              max_concurrent_per_link: int = 1,
              sequence: Sequence[Move] | None = None) -> MovePlan:
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
  bw, lat = cluster.bandwidth_matrix, cluster.latency_matrix
  w = float(model.expert_bytes)
  one = w / bw + lat  # [N, N] seconds of one copy alone
  c = max_concurrent_per_link
  held = h.sum(axis=(1, 2))
  steps: list[MoveStep] = []
  rounds: list[float] = []

  def copy_round(chosen):
    for m, (n, l, e) in chosen:
      h[n, l, e] = True
      steps.append(MoveStep("copy", n, l, e, source=m, round=len(rounds)))
    rounds.append(_round_time([(m, a[0]) for m, a in chosen], w, bw, lat))

  if sequence is not None:
    moves = [(tuple(a), None if v is None else tuple(v)) for a, v in sequence]
    check = apply_steps(h, [MoveStep("copy", *a) for a, _ in moves] +
                        [MoveStep("drop", *v) for _, v in moves if v is not None])
    if not np.array_equal(check, goal):
      raise MigrationError("the move sequence does not turn the current placement into the "
                           "target; pass the sequence of the plan that made the target.")
    done = np.zeros(len(moves), dtype=bool)
    ptr = 0  # evictions happen strictly in the planner's order
    while not done.all():
      while ptr < len(moves):
        v = moves[ptr][1]
        if v is not None:
          if h[:, v[1], v[2]].sum() < 2:
            break
          h[v] = False
          held[v[0]] -= 1
          steps.append(MoveStep("drop", *v, round=len(rounds)))
        ptr += 1
      ready = [i for i in np.flatnonzero(~done) if i < ptr or moves[i][1] is None]
      chosen, _ = _assign_copies([moves[i][0] for i in ready], h, held, cap, c, one, w, bw)
      if not chosen:
        raise MigrationError("the move sequence cannot proceed (an eviction would drop a last "
                             "copy); it did not come from plan_incremental on this placement.")
      picked = {a for _, a in chosen}
      done[[i for i in ready if moves[i][0] in picked]] = True
      copy_round(chosen)
    return MovePlan(tuple(steps), tuple(rounds), int(model.expert_bytes), 0)

  adds = [tuple(int(x) for x in a) for a in np.argwhere(goal & ~h)]
  pending_drop = {tuple(int(x) for x in d) for d in np.argwhere(h & ~goal)}
  staged = 0
  while adds:
    # Drops that make room for this round's copies (only replicas held elsewhere right now).
    want = {}
    for n, _, _ in adds:
      want[n] = min(want.get(n, 0) + 1, (n_srv - 1) * c)
    for n, k in want.items():
      room = int(cap[n] - held[n])
      for d in sorted(d for d in pending_drop if d[0] == n):
        if room >= k:
          break
        if h[:, d[1], d[2]].sum() >= 2:
          h[d] = False
          held[n] -= 1
          room += 1
          pending_drop.discard(d)
          steps.append(MoveStep("drop", *d, round=len(rounds)))
    chosen, rest = _assign_copies(adds, h, held, cap, c, one, w, bw)
    if not chosen:
      # Only cycles of sole copies between full servers remain: stage one copy over capacity.
      n, l, e = a = rest.pop(0)
      holders = np.flatnonzero(h[:, l, e])
      chosen.append((int(holders[np.argmin(one[holders, n])]), a))
      held[n] += 1
      staged += 1
    copy_round(chosen)
    adds = rest
  for d in sorted(pending_drop):
    h[d] = False
    held[d[0]] -= 1
    steps.append(MoveStep("drop", *d, round=len(rounds)))
  return MovePlan(tuple(steps), tuple(rounds), int(model.expert_bytes), staged)


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


# --------------------------------------------------------------------------------------------
# Scores and the trigger
# --------------------------------------------------------------------------------------------
def expected_latency(problem: PlacementProblem, placement: Placement,
                     phase: str = "decode") -> float:
  """Expected step latency (s) of ``placement`` with ``problem.tokens`` tokens per server per
  step, from :func:`moe_edge.cost.model.expected_cost`."""
  from moe_edge.cost.model import expected_cost  # the cost model imports placement.problem
  return expected_cost(problem, placement, problem.tokens, phase).latency


def objective_value(problem: PlacementProblem, placement: Placement, lam: float = 1.0) -> float:
  """The placement objective :func:`moe_edge.placement.objective.objective` (seconds/step)."""
  from moe_edge.placement.objective import objective
  return objective(problem, placement, lam)


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether to migrate. ``gain_s``/``cost_s`` are serving seconds over one interval
  (module docstring); ``saving_per_step_s`` = ``t_cur - t_new``."""
  migrate: bool
  gain_s: float
  cost_s: float
  reason: str
  saving_per_step_s: float = 0.0
  move: MovePlan | None = None


def should_migrate(problem: PlacementProblem, current: Placement, candidate: Placement,
                   steps_per_interval: float, move: MovePlan | None = None,
                   safety: float = 2.0, interference: float = 1.0,
                   max_concurrent_per_link: int = 1, phase: str = "decode",
                   score: Score | None = None,
                   saving_per_step: float | None = None) -> Decision:
  """The migration trigger (formula in the module docstring).

  Args:
    problem: the *current* statistics (``freq``) and tokens per step per server.
    current, candidate: the placement in use and the proposed one.
    steps_per_interval: steps until the next decision.
    move: the schedule from ``current`` to ``candidate`` (computed when None).
    safety: the saving must exceed ``safety`` times the move cost.
    interference: fraction of serving time lost while weights are in flight.
    score: step latency function (default :func:`expected_latency` in ``phase``).
    saving_per_step: an estimate of ``t_cur - t_new`` made elsewhere, e.g. on held-out
      statistics by :func:`cross_validated_saving`. Default: both scored on ``problem``, which
      is optimistic when ``candidate`` was planned on the same statistics (it also fits their
      sampling noise).
  """
  if steps_per_interval <= 0 or safety < 0 or not 0 <= interference:
    raise MigrationError(f"need steps_per_interval > 0, safety >= 0 and interference >= 0, got "
                         f"{steps_per_interval}, {safety}, {interference}.")
  score = score or (lambda p, x: expected_latency(p, x, phase))
  if move is None:
    move = move_cost(current, candidate, problem.model, problem.cluster, problem.capacity,
                     max_concurrent_per_link)
  if move.moves == 0 and move.drops == 0:
    return Decision(False, 0.0, 0.0, "candidate equals the current placement", 0.0, move)
  t_cur = score(problem, current)
  if saving_per_step is None:
    saving = t_cur - score(problem, candidate)
  else:
    saving = float(saving_per_step)
  t_new = t_cur - saving
  cost = interference * move.seconds
  served = max(0.0, steps_per_interval - move.seconds / max(t_cur, 1e-12))
  gain = saving * served
  if saving <= 0:
    return Decision(False, gain, cost, f"no gain: step latency {1e3 * t_cur:.3f} ms -> "
                    f"{1e3 * t_new:.3f} ms", saving, move)
  if gain <= safety * cost:
    return Decision(False, gain, cost, f"gain {gain:.3f} s <= {safety:g} x move cost "
                    f"{cost:.3f} s ({move.moves} copies)", saving, move)
  return Decision(True, gain, cost, f"gain {gain:.3f} s > {safety:g} x move cost {cost:.3f} s "
                  f"({move.moves} copies, {move.bytes / 1e6:.1f} MB)", saving, move)


def cross_validated_saving(problem_a: PlacementProblem, problem_b: PlacementProblem,
                           current: Placement, plan: Callable[[PlacementProblem], Placement],
                           score: Score | None = None, phase: str = "decode") -> float:
  """Held-out estimate of the step-latency saving of re-planning (two-fold cross-validation).

  ``problem_a`` and ``problem_b`` carry the statistics of two disjoint halves of the window
  (:meth:`OnlineStats.window_halves`). A plan fitted on one half is scored on the other::

    saving = ( score(b, current) - score(b, plan(a)) + score(a, current) - score(a, plan(b)) ) / 2

  Scoring a plan on the sample it was fitted to rewards fitting that sample's noise: with a
  stationary workload it reports a gain that never materialises, and a trigger fed with it
  migrates every interval. The held-out estimate is near zero (or negative) then and large after
  a real shift.
  """
  # Every plan is its own longest prefix (plan_prefix returns it unchanged).
  return cross_validated_savings(problem_a, problem_b, current, plan, score, phase)(sys.maxsize)


@dataclasses.dataclass(frozen=True)
class PrefixChoice:
  """How many of a plan's moves to make (:func:`choose_prefix`).

  Attributes:
    moves: copies of the chosen prefix (0: do not migrate).
    decision: the trigger's :class:`Decision` for that prefix (for the whole plan when no
      prefix pays).
    table: ``((copies, saving_per_step_s, gain_s, cost_s), ...)`` for every prefix judged.
  """
  moves: int
  decision: Decision
  table: tuple[tuple[int, float, float, float], ...]

  @property
  def migrate(self) -> bool:
    return self.moves > 0


def plan_prefix(problem: PlacementProblem, current: Placement, plan: Placement,
                k: int) -> Placement:
  """The placement after the first ``k`` moves of ``plan`` (a :func:`plan_incremental` result
  for ``current``): those added replicas and their evictions, kept experts in their slots,
  the nearest-replica route on ``problem``'s traffic. A prefix of a valid move sequence is
  valid, so the result carries ``info["moves"]``/``info["evicted"]`` for :func:`move_sequence`
  like a plan of budget ``k`` (which the greedy's prefix is, up to a relocation cut in half)."""
  seq = move_sequence(plan)
  if not 0 <= k <= len(seq):
    raise MigrationError(f"prefix of {k} moves asked of a plan with {len(seq)}.")
  if k == len(seq):
    return plan
  hosts = current.hosts.copy()
  for a, v in seq[:k]:
    hosts[a] = True
    if v is not None:
      hosts[v] = False
  info = dict(plan.info, moves=[list(a) for a, _ in seq[:k]],
              evicted=[None if v is None else list(v) for _, v in seq[:k]], prefix_of=len(seq))
  info.pop("score_after", None)
  return placement_with_slots(hosts, current, problem.model, problem.cluster, problem.traffic,
                              plan.method, info)


def prefix_grid(total: int, step: int) -> list[int]:
  """Prefix lengths ``step, 2 step, ..., total`` (always ending at ``total``; ``[total]`` when
  ``step <= 0``; ``[]`` when ``total == 0``)."""
  if total <= 0:
    return []
  if step <= 0:
    return [total]
  return [*range(step, total, step), total]


def choose_prefix(problem: PlacementProblem, current: Placement, plan: Placement,
                  steps_per_interval: float, savings: Callable[[int], float] | None = None,
                  step: int = 16, safety: float = 2.0, interference: float = 1.0,
                  max_concurrent_per_link: int = 1, phase: str = "decode",
                  score: Score | None = None) -> PrefixChoice:
  """The trigger applied to every prefix of a plan: make the prefix whose net gain is largest.

  A greedy plan ranks its moves best first, so its prefixes are the plans of smaller budgets.
  For each prefix of ``k`` copies (:func:`prefix_grid`) the trigger of :func:`should_migrate`
  weighs ``gain(k)`` against ``safety * cost(k)``; the choice is the approved prefix with the
  largest ``gain(k) - safety * cost(k)``, or no migration when none is approved. A move the
  workload does not pay for is not made, even when the budget would allow it; with ``step <= 0``
  only the whole plan is judged (all or nothing).

  Args:
    problem, current, plan: the statistics the plan was made on, the placement in use and the
      :func:`plan_incremental` result.
    steps_per_interval: serving steps the saving counts over (see :func:`should_migrate`).
    savings: ``k -> t_cur - t_new`` of the ``k``-move prefix, e.g. held out
      (:func:`cross_validated_savings`); default: scored on ``problem`` with ``score``.
    step: prefix resolution in copies.
    safety, interference, max_concurrent_per_link, phase, score: as in :func:`should_migrate`.
  """
  seq = move_sequence(plan)
  table, best, best_net, whole = [], None, -np.inf, None
  for k in prefix_grid(len(seq), step):
    cand = plan_prefix(problem, current, plan, k)
    move = move_cost(current, cand, problem.model, problem.cluster, problem.capacity,
                     max_concurrent_per_link, sequence=move_sequence(cand))
    dec = should_migrate(problem, current, cand, steps_per_interval, move, safety,
                         interference, max_concurrent_per_link, phase, score,
                         None if savings is None else float(savings(k)))
    table.append((k, dec.saving_per_step_s, dec.gain_s, dec.cost_s))
    whole = dec
    net = dec.gain_s - safety * dec.cost_s
    if dec.migrate and net > best_net:
      best, best_net = (k, dec), net
  if best is None:
    if whole is None:
      whole = Decision(False, 0.0, 0.0, "candidate equals the current placement")
    return PrefixChoice(0, whole, tuple(table))
  return PrefixChoice(best[0], best[1], tuple(table))


def cross_validated_savings(problem_a: PlacementProblem, problem_b: PlacementProblem,
                            current: Placement, plan: Callable[[PlacementProblem], Placement],
                            score: Score | None = None,
                            phase: str = "decode") -> Callable[[int], float]:
  """:func:`cross_validated_saving` for every prefix: ``k -> saving`` of the first ``k`` moves
  of the plans fitted on each half, scored on the other half (a plan shorter than ``k`` counts
  whole). The two plans are made once."""
  score = score or (lambda p, x: expected_latency(p, x, phase))
  plan_a, plan_b = plan(problem_a), plan(problem_b)
  base_a, base_b = score(problem_a, current), score(problem_b, current)

  def saving(k: int) -> float:
    pa = plan_prefix(problem_a, current, plan_a, min(k, len(plan_a.info["moves"])))
    pb = plan_prefix(problem_b, current, plan_b, min(k, len(plan_b.info["moves"])))
    return 0.5 * (base_b - score(problem_b, pa) + base_a - score(problem_a, pb))
  return saving


# --------------------------------------------------------------------------------------------
# Incremental planning
# --------------------------------------------------------------------------------------------
def _nearest(hosts: np.ndarray, link: np.ndarray) -> np.ndarray:
  """``[N, L, E]``: link time from each server to its nearest holder (0 if local, inf if none)."""
  d = np.where(hosts[None, :, :, :], link[:, :, None, None], np.inf)  # [n, holder, L, E]
  return d.min(axis=1)


def replica_values(hosts: np.ndarray, traffic: np.ndarray,
                   link: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Proxy gain of adding and loss of dropping each replica (module docstring's ``R``).

  Args:
    hosts: ``[N, L, E]`` bool.
    traffic: ``[N, L, E]`` token-choices per step.
    link: ``[N, N]`` seconds per remote token-choice (diagonal 0).
  Returns:
    ``add [N, L, E]``: decrease of ``R`` if server n added (l, e) (0 where hosted);
    ``drop [N, L, E]``: increase of ``R`` if n dropped it (inf where it is the last copy, 0
    where not hosted).
  """
  dist = _nearest(hosts, link)                                         # [m, L, E]
  closer = np.maximum(dist[None] - link.T[:, :, None, None], 0.0)      # [n, m, L, E]
  add = np.einsum("nmle,mle->nle", closer, traffic)
  add = np.where(hosts, 0.0, add)
  n_srv = hosts.shape[0]
  drop = np.zeros(hosts.shape)
  for n in range(n_srv):
    without = hosts.copy()
    without[n] = False
    dist_wo = _nearest(without, link)
    with np.errstate(invalid="ignore"):
      inc = np.where(np.isinf(dist_wo), np.inf, dist_wo - dist)
    drop[n] = np.einsum("mle,mle->le", np.where(traffic > 0, inc, 0.0), traffic)
    drop[n] = np.where(np.isinf(dist_wo).any(axis=0), np.inf, drop[n])
  return add, np.where(hosts, drop, 0.0)


def _relocations(hosts: np.ndarray, traffic: np.ndarray, link: np.ndarray, add: np.ndarray,
                 room: np.ndarray, evict: np.ndarray, victim: np.ndarray, keep: np.ndarray,
                 gone: np.ndarray) -> list[tuple[float, list[Move]]]:
  """Relocation candidates, one per full server ``n``: copy the sole copy ``x`` on ``n`` whose
  move costs least to a server ``m`` (into free room, or evicting ``m``'s cheapest replica),
  then let ``n``'s best add take the slot ``x`` leaves. Proxy gain per copy (two copies)::

    ( add[n, a] - (R_x(m) - R_x(n)) - evict_loss(m) ) / 2,   R_x(m) = sum_j x[j, x] link[j, m]

  (``R_x(m)``: link time of all of ``x``'s traffic when ``m`` holds its only copy). Replicas in
  ``keep`` are not moved and ones in ``gone`` (evicted earlier by the plan) are not re-added.
  """
  n_srv, n_lay, n_exp = hosts.shape
  solo = hosts & (hosts.sum(axis=0) == 1)[None] & ~keep
  home = np.einsum("jle,jm->mle", traffic, link)  # [m, L, E] R_x(m)
  dest = np.where(room > 0, 0.0, evict)  # [m] cost of making room on m
  out = []
  for n in np.flatnonzero(room <= 0):
    if not solo[n].any() or not np.any(add[n] > 0):
      continue
    shift = home - home[n][None] + dest[:, None, None]  # [m, L, E]
    shift = np.where(solo[n][None] & ~gone, shift, np.inf)
    shift[n] = np.inf
    m, lx, ex = np.unravel_index(int(np.argmin(shift)), shift.shape)
    if not np.isfinite(shift[m, lx, ex]):
      continue
    la, ea = np.unravel_index(int(np.argmax(add[n])), (n_lay, n_exp))
    g = float(add[n, la, ea] - shift[m, lx, ex])
    if g <= 0:
      continue
    vm = None if room[m] > 0 else (int(m), *(int(x) for x in np.unravel_index(victim[m],
                                                                            (n_lay, n_exp))))
    out.append((0.5 * g, [((int(m), int(lx), int(ex)), vm),
                          ((int(n), int(la), int(ea)), (int(n), int(lx), int(ex)))]))
  return out


def _layer_route(hosts: np.ndarray, route: np.ndarray, layers: Sequence[int],
                 model: ModelConfig, cluster: ClusterConfig,
                 traffic: np.ndarray) -> np.ndarray:
  """``route`` with the given layers recomputed (routing is independent per layer)."""
  out = route.copy()
  for l in sorted(set(layers)):
    out[:, l:l + 1] = nearest_replica_route(hosts[:, l:l + 1], model, cluster,
                                            traffic[:, l:l + 1])
  return out


def plan_incremental(problem: PlacementProblem, current: Placement,
                     max_moves: int | None = None, max_bytes: float | None = None,
                     score: Score | None = None, candidates: int = 8,
                     min_improvement: float = 1e-9, protect: np.ndarray | None = None,
                     relocate: bool = True, **objective_opts) -> Placement:
  """A placement close to ``current`` that serves ``problem.freq`` better (module docstring).

  Args:
    problem: the new statistics (``freq``, ``tokens``) and capacities.
    current: the placement in use; must be valid for ``problem``.
    max_moves: most added replicas (copies) this interval; None = unlimited.
    max_bytes: most bytes copied this interval; None = unlimited.
    score: exact score every accepted swap must lower (smaller is better). Default: the
      placement objective DanceMoE optimises,
      :func:`moe_edge.placement.objective.objective` with ``objective_opts`` (e.g. ``lam``),
      so an incremental plan and a full re-plan pursue the same goal. Pass e.g.
      ``lambda p, x: expected_latency(p, x)`` to follow the cost model instead.
    candidates: proxy-ranked swaps checked against ``score`` per move (first improving wins).
    min_improvement: relative decrease of the score a swap must bring.
    protect: optional ``[N, L, E]`` bool of replicas never evicted.
    relocate: also consider relocations (two copies): a full server whose replicas are all last
      copies (or worth more than the add) hands one of its sole copies to another server, and
      the freed slot takes the add. Without them a server filled with sole copies of cold
      experts by an earlier plan can never take its new hot experts.
  Returns:
    A validated :class:`Placement` whose kept experts keep their slots; ``info["moves"]`` lists
    the added replicas in order (``[n, l, e]``), ``info["evicted"]`` the replica each one
    evicted (or None when it used free room; :func:`move_sequence` pairs them), and
    ``info["score_before"]``/``info["score_after"]`` the score.
  """
  current.validate(problem)
  if max_moves is not None and max_moves < 0 or max_bytes is not None and max_bytes < 0:
    raise MigrationError(f"budgets must be >= 0, got max_moves={max_moves}, "
                         f"max_bytes={max_bytes}.")
  if score is None:
    score = lambda p, x: objective_value(p, x, **objective_opts)  # noqa: E731
  elif objective_opts:
    raise MigrationError(f"pass either score or objective options, not both "
                         f"({sorted(objective_opts)}).")
  model, cluster = problem.model, problem.cluster
  budget = np.inf if max_moves is None else int(max_moves)
  if max_bytes is not None:
    budget = min(budget, int(max_bytes // model.expert_bytes))
  traffic = problem.traffic
  link = link_time_per_token(model, cluster)
  np.fill_diagonal(link, 0.0)
  guard = np.zeros(problem.shape, bool) if protect is None else np.asarray(protect, bool)

  hosts = current.hosts.copy()
  route = current.route.copy()
  best = score(problem, current)
  start_score = best
  added, evicted = [], []
  fresh = np.zeros(problem.shape, dtype=bool)  # replicas added by this plan: never evicted
  gone = np.zeros(problem.shape, dtype=bool)   # replicas evicted by this plan: never re-added
  rejected: set[tuple] = set()
  n_srv = hosts.shape[0]
  while len(added) < budget:
    add, drop = replica_values(hosts, traffic, link)
    add = np.where(gone, 0.0, add)
    drop = np.where(fresh | guard, np.inf, drop)
    room = problem.capacity - hosts.sum(axis=(1, 2))
    # Cheapest eviction per server (inf when every replica there is a last copy).
    flat_drop = np.where(hosts, drop, np.inf).reshape(n_srv, -1)
    victim = flat_drop.argmin(axis=1)
    evict = flat_drop[np.arange(n_srv), victim]
    loss = np.where(room > 0, 0.0, evict)
    gain = add - loss[:, None, None]
    cands = []  # (proxy gain per copy, [(added, evicted or None), ...])
    for idx in np.argsort(-gain, axis=None, kind="stable")[:candidates]:
      if not gain.flat[idx] > 0:
        break
      n, l, e = (int(x) for x in np.unravel_index(idx, hosts.shape))
      v = None if room[n] > 0 else (n, *(int(x) for x in np.unravel_index(victim[n],
                                                                          hosts.shape[1:])))
      cands.append((float(gain.flat[idx]), [((n, l, e), v)]))
    if relocate and budget - len(added) >= 2:
      cands += _relocations(hosts, traffic, link, add, room, evict, victim, fresh | guard, gone)
    cands.sort(key=lambda c: -c[0])
    tried, accepted = 0, False
    for _, moves in cands:
      if tried >= candidates:
        break
      key = tuple(moves)
      if key in rejected:
        continue
      tried += 1
      h2 = hosts.copy()
      layers = []
      for a, v in moves:
        h2[a] = True
        layers.append(a[1])
        if v is not None:
          h2[v] = False
          layers.append(v[1])
      r2 = _layer_route(h2, route, layers, model, cluster, traffic)
      s2 = score(problem, Placement(h2, r2, slot_table(h2), "incremental"))
      if s2 < best - min_improvement * abs(best):
        hosts, route, best, accepted = h2, r2, s2, True
        for a, v in moves:
          fresh[a] = True
          added.append(list(a))
          evicted.append(None if v is None else list(v))
          if v is not None:
            gone[v] = True
        rejected.clear()
        break
      rejected.add(key)
    if not accepted:
      break
  info = dict(moves=added, evicted=evicted, score_before=float(start_score),
              score_after=float(best), budget=None if np.isinf(budget) else int(budget))
  p = Placement(hosts, route, assign_slots_stable(current.slot_expert, hosts), "incremental",
                info)
  p.validate(problem)
  return p


def local_coverage(problem: PlacementProblem, hosts: np.ndarray) -> float:
  """Expected share of token-choices served locally: ``sum(x * hosts) / sum(x)``, ``x`` the
  traffic (local choices always stay local, so this holds for every valid route)."""
  total = problem.traffic.sum()
  return float((problem.traffic * hosts).sum() / total) if total > 0 else 1.0


def min_copies_for_coverage(problem: PlacementProblem, current: Placement,
                            target: float) -> int | None:
  """A lower bound on the copies *any* plan needs to lift ``current``'s expected local coverage
  to ``target`` on ``problem``'s statistics (``x`` = traffic, coverage = local ``x`` / all).

  A copy onto server ``n`` makes at most ``x[n, l, e]`` of ``n``'s choices local. Beyond ``n``'s
  free room each copy needs a slot freed on ``n``, and freeing slots loses at least the local
  traffic of ``n``'s least used hosted experts (whatever is done with them elsewhere, and
  relocating costs copies too). So the ``j``-th copy onto ``n`` gains at most
  ``add_j(n) - loss_{j - room(n)}(n)`` (``add`` descending over ``n``'s missing experts, ``loss``
  ascending over its hosted ones), a decreasing sequence per server, and ``k`` copies gain at
  most the ``k`` largest of these over all servers. Returns the least ``k`` reaching ``target``
  (0 if already there), or None if no number of copies can.
  """
  x = problem.traffic
  total = x.sum()
  cov = local_coverage(problem, current.hosts)
  if cov >= target:
    return 0
  room = np.maximum(problem.capacity - current.hosts.sum(axis=(1, 2)), 0)
  marginals = []
  for n in range(x.shape[0]):
    add = np.sort(x[n][~current.hosts[n]])[::-1]
    loss = np.sort(x[n][current.hosts[n]])
    j = np.arange(add.size)
    freed = j - room[n]  # index into loss of the slot the (j + 1)-th copy needs
    ok = freed < loss.size
    marg = add[ok] - np.where(freed[ok] >= 0, loss[np.maximum(freed[ok], 0)], 0.0)
    marginals.append(marg[marg > 0])
  gains = np.sort(np.concatenate(marginals))[::-1]
  reach = cov + np.cumsum(gains) / total
  k = int(np.searchsorted(reach, target - 1e-12)) + 1
  return k if k <= gains.size else None


def full_replan(problem: PlacementProblem, current: Placement, method: str = "dancemoe",
                seed: int = 0, **opts) -> Placement:
  """Re-plan from scratch with a placement method (default DanceMoE), slots kept where the
  same expert stays on the same server. ``info["moves"]`` counts added replicas and
  ``info["changed_experts"]`` the experts whose host set changed."""
  from moe_edge.placement import place  # placement methods import this package's problem
  fresh = place(method, problem, seed=seed, **opts)
  moves = int((fresh.hosts & ~current.hosts).sum())
  info = dict(fresh.info, moves=moves, changed_experts=changed_experts(current, fresh))
  p = Placement(fresh.hosts, fresh.route, assign_slots_stable(current.slot_expert, fresh.hosts),
                fresh.method, info)
  p.validate(problem)
  return p


# --------------------------------------------------------------------------------------------
# Failure drill
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FailureReport:
  """What losing a server costs.

  Attributes:
    server: the failed server.
    lost_replicas: replicas it held.
    orphans: ``[(layer, expert)]`` experts it held alone: unreachable until re-loaded.
    rerouted_share: share of the surviving servers' token-choices whose destination changed
      (they now go to another replica at once).
    reloads: ``[(server, layer, expert)]`` where the orphans were re-loaded from storage.
    evicted: ``[(server, layer, expert)]`` replicas dropped to make room for them.
    storage_bytes: bytes read from checkpoint storage (not over links).
    recovery_s: seconds until every expert is reachable again (slowest server's loads).
  """
  server: int
  lost_replicas: int
  orphans: tuple[tuple[int, int], ...]
  rerouted_share: float
  reloads: tuple[tuple[int, int, int], ...]
  evicted: tuple[tuple[int, int, int], ...]
  storage_bytes: float
  recovery_s: float

  @property
  def unreachable_during_recovery(self) -> tuple[tuple[int, int], ...]:
    """Experts no token can reach until recovery ends (the orphans)."""
    return self.orphans


def failed_problem(problem: PlacementProblem, server: int) -> PlacementProblem:
  """``problem`` without ``server``: no tokens and no room there."""
  tokens, cap = problem.tokens.copy(), problem.capacity.copy()
  tokens[server], cap[server] = 0.0, 0
  return PlacementProblem(problem.model, problem.cluster, problem.freq, tokens, cap)


def fail_server(placement: Placement, server: int, problem: PlacementProblem,
                storage_bandwidth: float | Sequence[float] = DEFAULT_STORAGE_BANDWIDTH
                ) -> tuple[Placement, FailureReport]:
  """Lose ``server``: reroute at once, re-load the experts it held alone (module docstring).

  Args:
    placement: the placement in use (valid for ``problem``).
    server: the failed server's index.
    problem: statistics and capacities before the failure.
    storage_bandwidth: bytes/s a server reads checkpointed weights at (one value or ``[N]``).
  Returns:
    ``(placement after recovery, report)``. The new placement holds nothing on ``server`` and is
    valid for :func:`failed_problem`; kept experts keep their slots.
  """
  placement.validate(problem)
  n_srv, n_lay, n_exp = problem.shape
  if not 0 <= server < n_srv:
    raise MigrationError(f"server {server} does not exist; the cluster has servers 0..{n_srv - 1}.")
  if n_srv < 2:
    raise MigrationError("a one-server cluster cannot survive losing its server.")
  sbw = np.broadcast_to(np.asarray(storage_bandwidth, dtype=np.float64), (n_srv,))
  if np.any(~(sbw > 0)):
    raise MigrationError(f"storage_bandwidth must be > 0 bytes/s, got {storage_bandwidth}.")
  room = int(problem.capacity.sum() - problem.capacity[server])
  if room < n_lay * n_exp:
    short = (n_lay * n_exp - room) * problem.model.expert_bytes
    raise MigrationError(f"the surviving servers hold {room} experts but the model has "
                         f"{n_lay * n_exp}; losing server {server} cannot be survived without "
                         f"{short:,.0f} more bytes of expert memory.")
  after = failed_problem(problem, server)
  model, cluster = problem.model, problem.cluster
  traffic = after.traffic
  hosts = placement.hosts.copy()
  lost = int(hosts[server].sum())
  hosts[server] = False
  orphan_mask = ~hosts.any(axis=0)
  orphans = [tuple(int(x) for x in o) for o in np.argwhere(orphan_mask)]

  # Immediate fallback: every expert still held somewhere is routed to a surviving replica;
  # orphans keep pointing at the dead server (unreachable) until they are re-loaded.
  live = np.ones(n_srv, bool)
  live[server] = False
  interim = hosts.copy()
  interim[server] = orphan_mask
  immediate = nearest_replica_route(interim, model, cluster, traffic)
  survivors = traffic[live].sum()
  changed = (immediate != placement.route)[live] & ~orphan_mask[None]
  rerouted = float((traffic[live] * changed).sum() / survivors) if survivors > 0 else 0.0

  # Re-load orphans, hottest first, onto the surviving server that wants them most.
  link = link_time_per_token(model, cluster)
  np.fill_diagonal(link, 0.0)
  loads = np.zeros(n_srv, dtype=np.int64)
  reloads, evicted = [], []
  demand = traffic.sum(axis=0)
  for l, e in sorted(orphans, key=lambda o: -demand[o]):
    room = after.capacity - hosts.sum(axis=(1, 2))
    _, drop = replica_values(hosts, traffic, link)
    drop[~hosts] = np.inf
    drop[server] = np.inf
    # Value of hosting (l, e) on m: its local traffic, minus what an eviction would lose.
    evict_loss = np.where(room > 0, 0.0, drop.reshape(n_srv, -1).min(axis=1))
    value = traffic[:, l, e] - evict_loss
    value = np.where(live & np.isfinite(evict_loss), value, -np.inf)
    # Ties (e.g. no local demand anywhere) go to the server with the fewest loads queued.
    m = int(np.lexsort((loads / sbw, -value))[0])
    if not np.isfinite(value[m]):
      raise MigrationError(f"no surviving server can take expert {e} of layer {l}: every "
                           f"replica is a last copy and memory is full.")
    if room[m] <= 0:
      v = np.unravel_index(int(drop[m].argmin()), (n_lay, n_exp))
      hosts[m, v[0], v[1]] = False
      evicted.append((m, int(v[0]), int(v[1])))
    hosts[m, l, e] = True
    loads[m] += 1
    reloads.append((m, l, e))
  recovery = float(np.max(loads * model.expert_bytes / sbw)) if reloads else 0.0
  new = placement_with_slots(hosts, placement, model, cluster, traffic,
                             method=f"{placement.method}-failover",
                             info=dict(failed_server=server))
  new.validate(after)
  report = FailureReport(server=server, lost_replicas=lost, orphans=tuple(orphans),
                         rerouted_share=rerouted, reloads=tuple(reloads), evicted=tuple(evicted),
                         storage_bytes=float(len(reloads) * model.expert_bytes),
                         recovery_s=recovery)
  return new, report
