r"""Exchange local search: lower the placement objective by trading copies between servers.

The greedy of ``dancemoe.py`` adds one copy at a time, so it stops at placements that no single
change improves but a *pair* of changes does: server ``a`` drops a replica ``x`` and takes expert
``z`` from server ``b``, which uses the slot ``z`` leaves for a new copy ``y``. Neither half pays
alone (``a`` gains little from a second copy of ``z`` while ``b`` still holds it, and ``b`` may not
drop ``z`` while it is the last copy), together they do. On the seeded 8-server development
instances of ``benchmarks/bench_placement.py`` the greedy ends 2.6% above the ILP optimum of the
objective and no single replacement helps; these exchanges close most of that gap.

Notation (per column ``c = (l, e)``; ``T [C, N]`` traffic by source, ``tau [N, N]`` link time per
token, ``H_c`` the servers holding ``c``): the objective's communication term of a column under
nearest-copy routing is ``comm_c(H) = sum_m T[c, m] min_{h in H} tau[m, h]``, and it is separable
over columns. With ``d1``/``d2`` the nearest / second-nearest holder's link time of each source:

* add gain ``A[c, n] = sum_m T[c, m] relu(d1[c, m] - tau[m, n])`` (n not holding c);
* drop loss ``D[c, n] = sum_{m : nearest(m) = n} T[c, m] (d2[c, m] - d1[c, m])`` (inf for a
  last copy);
* move gain ``M[c, b -> a] = sum_m T[c, m] (d1[c, m] - min(w_b[c, m], tau[m, a]))`` of the copy
  on ``b`` going to ``a``, with ``w_b`` the nearest distance without ``b`` (``d2`` where ``b``
  was the nearest, else ``d1``).

A **chain** ``(b, a)`` moves a copy ``z`` from ``b`` to ``a``; ``a`` makes room by using free
memory, by dropping its cheapest removable replica ``x``, or by sending a copy ``x`` to ``b``
(a swap); when ``b`` is left with a free slot it adds its best new copy ``y`` if that gains.
``b == a`` is a plain replacement ``x -> y`` on one server. The gain (``M[z] - D[x] + A[y]``,
``M[z] + M[x]`` for a swap) is exact for
distinct columns. Each round takes the best chain of every server pair, best first, and applies
those that touch disjoint columns (so their gains add up exactly) and fit the servers' free
room; the values of the changed columns are then recomputed. After at most ``max_rounds``
rounds the exact objective (``objective.py``: the placement's real route table, whose ties
within ``slack`` go to the least loaded copy, and the compute term, neither of which the
nearest-copy values see) must be lower than before; if it is not, the search is redone with every
round checked on the exact objective of its layers (the round, else its best chain alone, must
lower it). The returned placement never has a higher objective than the input.
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.problem import PlacementProblem
from moe_edge.core.routing import route_table
from moe_edge.placement.objective import layer_loads

_TOL = 1e-12  # relative: an accepted round lowers the objective by more than this


class _Columns:
  """Per column: nearest / second-nearest holders and the exact add, drop and move values.

  ``add [C, N]``, ``drop [C, N]`` (inf: last copy or not held) and ``move [N, N, C]``
  (``move[b, a, c]``: gain of moving the copy of ``c`` on ``b`` to ``a``; -inf unless ``b``
  holds ``c`` and ``a`` does not), all of the nearest-copy communication term.
  """

  def __init__(self, hosts_cn: np.ndarray, traffic_cn: np.ndarray, tau: np.ndarray):
    self.h, self.t, self.tau = hosts_cn, traffic_cn, tau
    c, n = hosts_cn.shape
    self.add = np.zeros((c, n))
    self.drop = np.zeros((c, n))
    self.move = np.zeros((n, n, c))  # [b, a, column]: argmax over contiguous columns
    self.refresh(np.arange(c))

  def refresh(self, cols: np.ndarray) -> None:
    """Recompute the values of ``cols`` from the holders (in blocks of bounded memory)."""
    n = self.h.shape[1]
    step = max(1, (1 << 21) // n ** 3)
    for s in range(0, cols.size, step):
      self._refresh(cols[s:s + step])

  def _refresh(self, cols: np.ndarray) -> None:
    h = self.h[cols]                                               # [K, N]
    k, n = h.shape
    dm = np.where(h[:, None, :], self.tau[None], np.inf)           # [K, source m, holder]
    a1 = dm.argmin(axis=2)
    d1 = np.take_along_axis(dm, a1[..., None], axis=2)[..., 0]
    np.put_along_axis(dm, a1[..., None], np.inf, axis=2)
    d2 = dm.min(axis=2)
    t = self.t[cols]                                               # [K, m]
    self.add[cols] = np.where(h, 0.0, np.einsum(
        "km,kmn->kn", t, np.maximum(d1[:, :, None] - self.tau[None], 0.0)))
    # Without holder b, source m's nearest copy is d2 if it was b, else d1: [K, m, b].
    without = np.where(a1[:, :, None] == np.arange(n), d2[:, :, None], d1[:, :, None])
    with np.errstate(invalid="ignore"):
      self.drop[cols] = np.where(h & (h.sum(axis=1, keepdims=True) >= 2), np.einsum(
          "km,kmb->kb", t, np.where(t[:, :, None] > 0, without - d1[:, :, None], 0.0)), np.inf)
    # move[b, a] = sum_m t[m] (d1[m] - min(without[m, b], tau[m, a])), as one batched matmul.
    near = np.minimum(without.transpose(0, 2, 1)[:, :, None, :],
                      self.tau.T[None, None, :, :])                 # [K, b, a, m]
    mv = (t * d1).sum(axis=1)[:, None, None] - (near.reshape(k, n * n, n) @ t[:, :, None]
                                               ).reshape(k, n, n)
    self.move[:, :, cols] = np.where(h[:, :, None] & ~h[:, None, :], mv, -np.inf).transpose(
        1, 2, 0)


def _best_chains(cols: _Columns, room: np.ndarray, adds: bool = True):
  """The best chain of every server pair (module docstring).

  Returns ``gain [b, a]`` and the columns ``z [b, a]`` (moved b -> a; -1 when b == a), ``x [b, a]``
  (a's slot: dropped or, in a swap, moved a -> b; -1 when a uses free room) and ``y [b, a]``
  (added on b; -1 for none), with ``swap [b, a]`` telling whether x moves to b.
  """
  h, add, drop, move = cols.h, cols.add, cols.drop, cols.move
  c, n = h.shape
  ar = np.arange(n)
  x_drop = np.argmin(drop, axis=0)                                 # a's cheapest drop
  drop_loss = drop[x_drop, ar]
  y_best = np.argmax(np.where(h, -np.inf, add), axis=0)            # b's best add
  y_gain = np.where(h[y_best, ar] | (not adds), -np.inf, add[y_best, ar])
  z_best = move.argmax(axis=2)                                     # [b, a] best copy b -> a
  z_gain = np.take_along_axis(move, z_best[..., None], axis=2)[..., 0]
  # z: b -> a; a's slot: free room, or drop x (then b may add y), or swap (x: a -> b).
  fill = np.maximum(y_gain, 0.0)[:, None]                          # b adds y only if it pays
  opt_room = np.where(room[None, :] > 0, z_gain + fill, -np.inf)
  same_xy = x_drop[None, :] == y_best[:, None]                     # not separable: skip
  opt_drop = np.where(same_xy, -np.inf, z_gain - drop_loss[None, :] + fill)
  opt_swap = z_gain + z_gain.T                                     # x = z_best[a, b]
  gain = np.maximum(opt_room, np.maximum(opt_drop, opt_swap))
  swap = (opt_swap >= np.maximum(opt_room, opt_drop))
  use_room = ~swap & (opt_room >= opt_drop)
  x = np.where(swap, z_best.T, np.where(use_room, -1, x_drop[None, :]))
  y = np.where(swap | (y_gain[:, None] <= 0), -1, y_best[:, None])
  z = z_best.copy()
  # b == a: replace x by y on one server (into free room: just add y).
  diag = np.where(room > 0, y_gain, y_gain - drop_loss)
  diag = np.where(x_drop == y_best, -np.inf, diag)
  gain[ar, ar] = diag
  x[ar, ar] = np.where(room > 0, -1, x_drop)
  y[ar, ar] = y_best
  z[ar, ar] = -1
  swap[ar, ar] = False
  return gain, x, z, y, swap


def _round(cols: _Columns, room: np.ndarray, tol: float,
           adds: bool = True) -> list[list[tuple[int, int, bool]]]:
  """One round's chains: every server pair's best, best first, on disjoint columns (so their
  gains add up exactly) and within the servers' free room."""
  n = room.size
  gain, x, z, y, swap = _best_chains(cols, room, adds)
  bs, as_ = np.nonzero(gain > tol)
  order = np.argsort(-gain[bs, as_], kind="stable")
  batch, used, left = [], set(), room.tolist()
  for b, a in zip(bs[order].tolist(), as_[order].tolist()):
    ch = _chain(b, a, int(x[b, a]), int(z[b, a]), int(y[b, a]), bool(swap[b, a]))
    if any(cc in used for _, cc, _ in ch):
      continue
    need = dict.fromkeys((a, b), 0)
    for srv, _, on in ch:
      need[srv] += 1 if on else -1
    if any(left[srv] < k for srv, k in need.items()):
      continue
    batch.append(ch)
    used.update(cc for _, cc, _ in ch)
    for srv, k in need.items():
      left[srv] -= k
  return batch


def _chain(b: int, a: int, x: int, z: int, y: int, swap: bool) -> list[tuple[int, int, bool]]:
  """The changes ``(server, column, now held)`` of chain ``(b, a)`` (``_best_chains``)."""
  out = []
  if z >= 0:
    out += [(b, z, False), (a, z, True)]
  if x >= 0:
    out += [(a, x, False)] + ([(b, x, True)] if swap else [])
  if y >= 0:
    out.append((b, y, True))
  return out


def exchange_search(problem: PlacementProblem, hosts: np.ndarray, lam: float = 1.0,
                    slack: float = 0.1, max_rounds: int = 64,
                    adds: bool = True, verify: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Exchange local search on ``hosts [N, L, E]`` (module docstring).

  Args:
    problem: the placement problem; ``hosts`` must host every expert within its capacity.
    lam, slack: the objective's load-balance weight and the route table's slack.
    max_rounds: bound on rounds.
    adds: allow chains that add a copy ``y`` (off: copies only move or swap, so the number of
      copies per expert stays as it is, e.g. for DanceMoE without replicas).
    verify: check every round's chains on the exact objective of the changed layers (else
      once, at the end, falling back to verified rounds when the search did not lower it).
  Returns:
    ``(hosts, route, stats)``: the improved hosts, their route table
    (``core.routing.route_table``) and ``rounds``, ``chains``, ``verified``,
    ``objective_before``, ``objective_after`` (the exact objective of all layers).
  """
  hosts = np.array(hosts, dtype=bool)
  n, nl, e = hosts.shape
  hw = problem.hardware
  tau = hw.link_time_per_token().copy()
  np.fill_diagonal(tau, 0.0)
  traffic = problem.traffic
  t_comp = hw.compute_time_per_token()

  def layer_obj(h, layers):
    """``([L'] exact objective, route [N, L', E])`` of ``layers`` (their real route tables)."""
    tr = traffic[:, layers]
    r = route_table(h[:, layers], hw, tr, slack)
    comm = np.einsum("nle,nle->l", tr, tau[np.arange(n)[:, None, None], r])
    load = layer_loads(problem, r, tr)
    return comm + lam * (load * t_comp[:, None]).max(axis=0), r

  def apply(h_cn, batch):
    for ch in batch:
      for srv, cc, on in ch:
        h_cn[cc, srv] = on

  h_cn = np.ascontiguousarray(hosts.reshape(n, nl * e).T)          # [C, N] view of columns
  cols = _Columns(h_cn, np.ascontiguousarray(traffic.reshape(n, nl * e).T), tau)
  all_layers = np.arange(nl)
  score, route = layer_obj(hosts, all_layers)
  before = float(score.sum())
  room = problem.capacity - hosts.sum(axis=(1, 2))
  stats = dict(rounds=0, chains=0, verified=verify)
  tol = _TOL * max(before, 1e-300)
  for _ in range(max_rounds):
    batch = _round(cols, room, tol, adds)
    if not batch:
      break
    if verify:  # the whole round, else its best chain alone, must lower the exact objective
      for trial_batch in (batch, batch[:1]):
        trial = h_cn.copy()
        apply(trial, trial_batch)
        layers = np.unique([cc // e for ch in trial_batch for _, cc, _ in ch])
        new, r = layer_obj(trial.T.reshape(n, nl, e), layers)
        if new.sum() < score[layers].sum() - tol:
          score[layers], route[:, layers] = new, r
          break
      else:
        trial_batch = []
      batch = trial_batch
    if not batch:
      break
    apply(h_cn, batch)
    cols.refresh(np.unique([cc for ch in batch for _, cc, _ in ch]).astype(np.int64))
    room = problem.capacity - h_cn.sum(axis=0)
    stats["chains"] += len(batch)
    stats["rounds"] += 1
  out = np.ascontiguousarray(h_cn.T).reshape(n, nl, e)
  if not verify and stats["chains"]:
    score, route = layer_obj(out, all_layers)
    if not score.sum() < before - tol:  # the real routing disagreed: verify round by round
      return exchange_search(problem, hosts, lam, slack, max_rounds, adds, verify=True)
  stats.update(objective_before=before, objective_after=float(score.sum()))
  return out, route, stats
