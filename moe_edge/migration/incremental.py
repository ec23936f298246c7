r"""Incremental planning: a placement close to the current one that serves the new statistics.

**Incremental planning** (:func:`plan_incremental`). Greedy moves on the current placement:
add replica ``(n, l, e)`` (into free room on ``n``, or evicting the least valuable replica on
``n`` that is not the last copy of its expert), or *relocate* (two copies: a full server hands one
of its sole copies to another server and the freed slot takes the add), best gain per copy
first, until the move or byte budget is spent or nothing gains. Candidates are ranked by a fast
*proxy*, the change of the traffic-weighted link time to the nearest replica,

  ``R = sum_{n,l,e} x[n,l,e] * min_{m : hosts[m,l,e]} link[n, m]``,  ``x = tokens * freq``,
  ``link`` = :meth:`problem.hardware.link_time_per_token <moe_edge.core.hardware.Hardware.link_time_per_token>`

(adding a replica lowers it for every server that gets closer; evicting raises it for every
server that loses its nearest replica), and each accepted move must lower the exact *score*:
by default the placement objective DanceMoE minimises
(:func:`moe_edge.placement.objective.objective`), so the incremental and the full re-plan pursue
one goal. Replicas added by a plan are never evicted by it and evicted ones never re-added.
Unchanged experts keep their slots (:func:`assign_slots_stable`), and
:func:`hosted_at_every_moment` checks any step sequence. :func:`min_copies_for_coverage` bounds
from below the copies *any* plan needs to reach a coverage, to tell a weak planner from an
impossible target.

"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem, slot_table
from moe_edge.core.routing import route_table
from moe_edge.migration.schedule import Move
from moe_edge.migration.slots import MigrationError, assign_slots_stable, changed_experts
from moe_edge.placement import place
from moe_edge.placement.objective import objective

Score = Callable[[PlacementProblem, Placement], float]


def objective_value(problem: PlacementProblem, placement: Placement, lam: float = 1.0) -> float:
  """The placement objective :func:`moe_edge.placement.objective.objective` (seconds/step)."""
  return objective(problem, placement, lam)


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
                 hardware: Hardware, traffic: np.ndarray) -> np.ndarray:
  """``route`` with the given layers recomputed (routing is independent per layer)."""
  out = route.copy()
  for l in sorted(set(layers)):
    out[:, l:l + 1] = route_table(hosts[:, l:l + 1], hardware, traffic[:, l:l + 1])
  return out


def _candidates(problem: PlacementProblem, hosts: np.ndarray, link: np.ndarray,
                keep: np.ndarray, gone: np.ndarray, candidates: int,
                relocate: bool) -> list[tuple[float, list[Move]]]:
  """Proxy-ranked moves on ``hosts``, best first: ``(gain per copy, [(added, evicted or
  None), ...])``; the ``candidates`` best single adds, plus relocations when ``relocate``.
  Replicas in ``keep`` are never evicted, ones in ``gone`` never re-added."""
  traffic, n_srv = problem.traffic, hosts.shape[0]
  add, drop = replica_values(hosts, traffic, link)
  add = np.where(gone, 0.0, add)
  drop = np.where(keep, np.inf, drop)
  room = problem.capacity - hosts.sum(axis=(1, 2))
  # Cheapest eviction per server (inf when every replica there is a last copy).
  flat_drop = np.where(hosts, drop, np.inf).reshape(n_srv, -1)
  victim = flat_drop.argmin(axis=1)
  evict = flat_drop[np.arange(n_srv), victim]
  loss = np.where(room > 0, 0.0, evict)
  gain = add - loss[:, None, None]
  cands = []
  for idx in np.argsort(-gain, axis=None, kind="stable")[:candidates]:
    if not gain.flat[idx] > 0:
      break
    n, l, e = (int(x) for x in np.unravel_index(idx, hosts.shape))
    v = None if room[n] > 0 else (n, *(int(x) for x in np.unravel_index(victim[n],
                                                                        hosts.shape[1:])))
    cands.append((float(gain.flat[idx]), [((n, l, e), v)]))
  if relocate:
    cands += _relocations(hosts, traffic, link, add, room, evict, victim, keep, gone)
  cands.sort(key=lambda c: -c[0])
  return cands


def _with_moves(hosts: np.ndarray, route: np.ndarray, moves: list[Move], hardware: Hardware,
                traffic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(hosts, route)`` after ``moves`` (routes of the touched layers recomputed)."""
  h2 = hosts.copy()
  layers = []
  for a, v in moves:
    h2[a] = True
    layers.append(a[1])
    if v is not None:
      h2[v] = False
      layers.append(v[1])
  return h2, _layer_route(h2, route, layers, hardware, traffic)


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
  budget = np.inf if max_moves is None else int(max_moves)
  if max_bytes is not None:
    budget = min(budget, int(max_bytes // problem.model.expert_bytes))
  traffic, hw = problem.traffic, problem.hardware
  link = hw.link_time_per_token()
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
  while len(added) < budget:
    cands = _candidates(problem, hosts, link, fresh | guard, gone, candidates,
                        relocate and budget - len(added) >= 2)
    tried, accepted = 0, False
    for _, moves in cands:
      if tried >= candidates:
        break
      key = tuple(moves)
      if key in rejected:
        continue
      tried += 1
      h2, r2 = _with_moves(hosts, route, moves, hw, traffic)
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
  fresh = place(method, problem, seed=seed, **opts)
  moves = int((fresh.hosts & ~current.hosts).sum())
  info = dict(fresh.info, moves=moves, changed_experts=changed_experts(current, fresh))
  p = Placement(fresh.hosts, fresh.route, assign_slots_stable(current.slot_expert, fresh.hosts),
                fresh.method, info)
  p.validate(problem)
  return p
