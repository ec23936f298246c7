"""DanceMoE: activation-aware expert placement for heterogeneous edge servers.

The method minimises the objective of ``objective.py`` (link time of remote token-choices plus
``lam`` times the slowest server's expert compute per layer) greedily, in four steps:

1. **Entropy budgets.** For server n and layer l, the activation entropy
   ``H[n, l] = -sum_e p log p`` of ``p = F[n, l, :] / sum_e F[n, l, e]`` gives the effective
   number of experts ``exp(H)``. A skewed (low-entropy) layer reaches high local coverage with
   few local experts, a flat one needs many, so server n's capacity is split over layers in
   proportion to ``exp(H[n, l])``: integer budgets ``b[n, l]`` with ``sum_l b = capacity[n]``,
   ``1 <= b <= E`` (largest remainders).
2. **Mandatory coverage.** Every expert is hosted once: experts in decreasing total traffic
   take the server with room that minimises ``sum_m T[m, l, e] * tau[m, n]`` (the link time
   of all its traffic; with uniform links: the server where it is hottest) plus ``lam`` times
   its compute time there ``sum_m T[m, l, e] * t[n]``; equal costs go to the faster server.
3. **Greedy marginal-gain replicas.** Replicas ``(n, l, e)`` are added in decreasing gain per
   byte (all routed experts have the same size, so gain order). The gain is the objective
   reduction under nearest-replica routing: ``sum_m T[m, l, e] * max(0, d[m, l, e] -
   tau[m, n])`` (``d`` = link time to the nearest current replica, zero when local), minus a
   compute-imbalance penalty ``lam * (relu((load[n, l] + moved) * t[n] - Z_l) -
   relu(load[n, l] * t[n] - Z_l))``, where ``moved`` is the traffic the replica attracts,
   ``t[n]`` the per-token compute time of server n (slow servers pay more) and ``Z_l`` the
   perfectly balanced compute time of layer l. First every (server, layer) fills up to its
   budget (one best replica per layer per round; layers do not interact within their budgets),
   then any capacity left (where mandatory copies overfilled some budgets, or budgets are off)
   is filled without budgets (one best replica per server per round, one per expert). Only
   positive gains are taken.
4. **Routing**: ``problem.nearest_replica_route`` with the traffic.

Options for ablations: ``entropy_budgets=False`` (step 3 without budgets), ``hetero_aware=False``
(decisions see every server at the mean speed and break ties by server id) and
``replicas=False`` (steps 1 and 3 skipped: every expert exactly once).
"""
from __future__ import annotations

import time

import numpy as np

from moe_edge.placement.common import finish, greedy_assign
from moe_edge.placement.objective import compute_time_per_token
from moe_edge.placement.problem import Placement, PlacementError, PlacementProblem
from moe_edge.placement.problem import link_time_per_token

_CHUNK = 1024


def layer_budgets(freq: np.ndarray, capacity: np.ndarray) -> np.ndarray:
  """``[N, L]`` int local-expert budgets proportional to ``exp(entropy)`` (module docstring).

  Args:
    freq: ``[N, L, E]`` activation frequencies (rows with no traffic count as uniform).
    capacity: ``[N]`` experts each server holds.
  """
  n, l, e = freq.shape
  tot = freq.sum(axis=2, keepdims=True)
  p = np.where(tot > 0, freq / np.where(tot > 0, tot, 1.0), 1.0 / e)
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=2)
  eff = np.exp(ent)  # [N, L], in [1, E]
  total = np.minimum(np.asarray(capacity, dtype=np.int64), l * e)
  lo = np.where(total >= l, 1, 0)[:, None].astype(np.float64)
  # Scale s[n] with sum_l clip(s * eff, lo, E) = total[n], by bisection (monotone in s).
  a, b = np.zeros(n), np.full(n, float(e) * l + 1.0)
  for _ in range(64):
    mid = 0.5 * (a + b)
    over = np.clip(mid[:, None] * eff, lo, e).sum(axis=1) > total
    a, b = np.where(over, a, mid), np.where(over, mid, b)
  share = np.clip(a[:, None] * eff, lo, e)
  budget = np.floor(share).astype(np.int64)
  left = total - budget.sum(axis=1)
  frac = np.where(budget < e, share - budget, -1.0)
  order = np.argsort(-frac, axis=1, kind="stable")
  bump = np.arange(l)[None, :] < left[:, None]
  np.put_along_axis(budget, order, np.take_along_axis(budget, order, axis=1) + bump, axis=1)
  return budget


class _Greedy:
  """State of step 3, in layer-major layout ``[L, N, E]`` (see the module docstring).

  ``d`` is the link time of each (layer, source, expert) to its nearest replica, ``a`` that
  replica, ``load [L, N]`` the traffic each server computes under this routing, ``c`` the comm
  gain and ``delta`` the traffic a new replica would attract; ``g = c - penalty`` (``-inf`` where
  already hosted) with per-row maxima ``row_max / row_arg [L, N]`` kept up to date.
  """

  def __init__(self, traffic, hosts, tau, t, lam):
    self.tl = np.ascontiguousarray(traffic.transpose(1, 0, 2))  # [L, N, E]
    self.hosts = np.ascontiguousarray(hosts.transpose(1, 0, 2))
    self.tau, self.t, self.lam = tau, t, lam
    nl, n, e = self.tl.shape
    off = tau[~np.eye(n, dtype=bool)].reshape(n, n - 1) if n > 1 else np.zeros((n, 0))
    self.uniform = bool(np.all(off == off[:, :1]))  # each source: one link time to all others
    self.zbal = self.tl.sum(axis=(1, 2)) / np.sum(1.0 / t)  # [L] balanced compute time
    self.d = np.empty_like(self.tl)
    self.a = np.empty(self.tl.shape, dtype=np.int64)
    self.c = np.empty_like(self.tl)
    self.delta = np.empty_like(self.tl)
    lk, ek = np.meshgrid(np.arange(nl), np.arange(e), indexing="ij")
    lk, ek = lk.ravel(), ek.ravel()
    for s in range(0, lk.size, _CHUNK):
      self._columns(lk[s:s + _CHUNK], ek[s:s + _CHUNK])
    cell = (np.arange(nl)[:, None, None] * n + self.a).ravel()
    self.load = np.bincount(cell, weights=self.tl.ravel(), minlength=nl * n).reshape(nl, n)
    self.g = np.empty_like(self.tl)
    self.row_max = np.empty((nl, n))
    self.row_arg = np.empty((nl, n), dtype=np.int64)
    self._rows(np.repeat(np.arange(nl), n), np.tile(np.arange(n), nl))

  def _columns(self, lk, ek):
    """Recompute d, a, c, delta of columns (lk, :, ek) from the hosts."""
    h = self.hosts[lk, :, ek]  # [K, N]
    dm = np.where(h[:, None, :], self.tau[None], np.inf)  # [K, source, replica]
    a = dm.argmin(axis=2)
    d = np.take_along_axis(dm, a[..., None], axis=2)[..., 0]
    tk = self.tl[lk, :, ek]
    if self.uniform:
      c, delta = tk * d, tk * (d > 0)
    else:
      r = d[:, :, None] - self.tau[None]  # [K, source m, new replica n]
      c = np.einsum("km,kmn->kn", tk, np.maximum(r, 0.0))
      delta = np.einsum("km,kmn->kn", tk, (r > 0).astype(np.float64))
    self.d[lk, :, ek], self.a[lk, :, ek] = d, a
    self.c[lk, :, ek], self.delta[lk, :, ek] = c, delta

  def _penalty(self, lk, nk):
    """``[K, E]`` compute-imbalance penalty of adding each expert to rows (lk, nk)."""
    if self.lam == 0:
      return 0.0
    z = self.zbal[lk][:, None]
    t = self.t[nk][:, None]
    base = self.load[lk, nk][:, None]
    return self.lam * (np.maximum((base + self.delta[lk, nk]) * t - z, 0.0)
                       - np.maximum(base * t - z, 0.0))

  def _rows(self, lk, nk):
    """Recompute gains and row maxima of rows (lk, nk)."""
    if lk.size == 0:
      return
    g = np.where(self.hosts[lk, nk], -np.inf, self.c[lk, nk] - self._penalty(lk, nk))
    self.g[lk, nk] = g
    arg = g.argmax(axis=1)
    self.row_arg[lk, nk] = arg
    self.row_max[lk, nk] = g[np.arange(lk.size), arg]

  def add(self, lk, nk, ek):
    """Add replicas (lk, nk, ek) (distinct columns) and update every derived quantity."""
    n = self.tl.shape[1]
    old_a, old_d = self.a[lk, :, ek], self.d[lk, :, ek]  # [K, N]
    self.hosts[lk, nk, ek] = True
    moved = self.tau[:, nk].T < old_d  # [K, source]: sources now closer to the new replica
    tk = self.tl[lk, :, ek]
    kk, mm = np.nonzero(moved)
    np.add.at(self.load, (lk[kk], old_a[kk, mm]), -tk[kk, mm])
    np.add.at(self.load, (lk[kk], nk[kk]), tk[kk, mm])
    self._columns(lk, ek)
    # Column entries changed in every row of the layer; rows whose load changed get recomputed.
    rows_l = np.repeat(lk, n)
    rows_n = np.tile(np.arange(n), lk.size)
    col_e = np.repeat(ek, n)
    changed = np.zeros(self.row_max.shape, dtype=bool)
    changed[lk[kk], old_a[kk, mm]] = True
    changed[lk, nk] = True
    pen = self._penalty(rows_l, rows_n)
    if not np.isscalar(pen):
      pen = pen[np.arange(rows_l.size), col_e]
    g = np.where(self.hosts[rows_l, rows_n, col_e], -np.inf,
                 self.c[rows_l, rows_n, col_e] - pen)
    self.g[rows_l, rows_n, col_e] = g
    cur_max, cur_arg = self.row_max[rows_l, rows_n], self.row_arg[rows_l, rows_n]
    stale = cur_arg == col_e
    better = ~stale & ((g > cur_max) | ((g == cur_max) & (col_e < cur_arg)))
    self.row_max[rows_l[better], rows_n[better]] = g[better]
    self.row_arg[rows_l[better], rows_n[better]] = col_e[better]
    changed[rows_l[stale], rows_n[stale]] = True
    self._rows(*np.nonzero(changed))

  def fill(self, room, budget_left=None):
    """Greedy rounds until no positive gain fits; returns replicas added. Modifies ``room``.

    With ``budget_left [L, N]``: one replica per layer per round, within the budgets. Without:
    one replica per server per round, at most one per expert.
    """
    added = 0
    n_lay, n = self.row_max.shape
    while True:
      ok = room[None, :] > 0
      if budget_left is not None:
        ok = ok & (budget_left > 0)
      score = np.where(ok, self.row_max, -np.inf)
      if budget_left is not None:
        lk = np.arange(n_lay)
        nk = score.argmax(axis=1)
        val = score[lk, nk]
      else:
        nk = np.arange(n)
        lk = score.argmax(axis=0)
        val = score[lk, nk]
      pick = val > 0
      if not pick.any():
        return added
      lk, nk, val = lk[pick], nk[pick], val[pick]
      ek = self.row_arg[lk, nk]
      order = np.lexsort((nk, lk, -val))  # best first
      if budget_left is None:  # one replica per expert per round: the best server wins
        _, first = np.unique((lk * self.tl.shape[2] + ek)[order], return_index=True)
        keep = np.sort(order[first])
      else:  # layers share servers: a server takes at most its room, best first
        srv = nk[order]
        by_srv = np.argsort(srv, kind="stable")
        starts = np.searchsorted(srv[by_srv], srv[by_srv])
        nth = np.empty_like(srv)
        nth[by_srv] = np.arange(srv.size) - starts
        keep = np.sort(order[nth < room[srv]])
      lk, nk, ek = lk[keep], nk[keep], ek[keep]
      self.add(lk, nk, ek)
      np.subtract.at(room, nk, 1)
      if budget_left is not None:
        budget_left[lk, nk] -= 1
      added += lk.size


def dancemoe(problem: PlacementProblem, seed: int = 0, lam: float = 1.0,
             entropy_budgets: bool = True, hetero_aware: bool = True, replicas: bool = True,
             route_slack: float = 0.1) -> Placement:
  """Activation-aware placement (module docstring). ``seed`` is unused (deterministic).

  Args:
    lam: weight of the load-balance term of the objective (``objective.py``).
    entropy_budgets: split each server's memory over layers by activation entropy first.
    hetero_aware: use each server's own compute speed (else the mean) and prefer faster servers
      on ties.
    replicas: add replicas (else every expert exactly once).
    route_slack: the ``slack`` of the nearest-replica route.
  """
  if lam < 0:
    raise PlacementError(f"lam={lam}: the load-balance weight must be >= 0.")
  start = time.perf_counter()
  n, l, e = problem.shape
  t = compute_time_per_token(problem)
  if not hetero_aware:
    t = np.full(n, t.mean())
  perm = np.argsort(t, kind="stable") if hetero_aware else np.arange(n)  # fastest first
  traffic = problem.traffic[perm]
  tau = link_time_per_token(problem.model, problem.cluster)[np.ix_(perm, perm)]
  t = t[perm]
  cap = problem.capacity[perm].astype(np.int64)

  # 2. Mandatory coverage: one copy of every expert.
  flat = traffic.reshape(n, l * e)
  total = flat.sum(axis=0)
  cost = np.einsum("mk,mn->kn", flat, tau) + lam * total[:, None] * t[None, :]
  owner = greedy_assign(cost, np.argsort(-total, kind="stable"), cap)
  hosts = np.zeros((n, l * e), dtype=bool)
  hosts[owner, np.arange(l * e)] = True
  hosts = hosts.reshape(n, l, e)
  info = dict(seed=seed, lam=lam, entropy_budgets=entropy_budgets, hetero_aware=hetero_aware,
              replicas=replicas)

  # 1 + 3. Budgets and greedy replicas.
  if replicas:
    room = cap - hosts.sum(axis=(1, 2))
    greedy = _Greedy(traffic, hosts, tau, t, lam)
    in_budget = 0
    if entropy_budgets:
      budget = layer_budgets(problem.freq[perm], cap)
      left = np.maximum(budget.T - hosts.sum(axis=2).T, 0)  # [L, N]
      in_budget = greedy.fill(room, left)
      info["budget_mean_per_layer"] = budget.mean(axis=0).round(2).tolist()
    free = greedy.fill(room)
    hosts = greedy.hosts.transpose(1, 0, 2)
    info.update(replicas_in_budget=int(in_budget), replicas_free=int(free))
  out = np.empty_like(hosts)
  out[perm] = hosts
  return finish(problem, out, "dancemoe", start, info, lam=lam, slack=route_slack)

