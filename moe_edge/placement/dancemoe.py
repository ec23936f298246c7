"""DanceMoE: activation-aware expert placement for heterogeneous edge servers.

The method minimises the objective of ``objective.py`` (link time of remote token-choices plus
``lam`` times the slowest server's expert compute per layer) greedily. Notation: traffic
``T [N, L, E]``, link time per token ``tau [N, N]``, compute time per token ``t [N]``.

1. **Entropy budgets.** For server n and layer l, the activation entropy
   ``H[n, l] = -sum_e p log p`` of ``p = F[n, l, :] / sum_e F[n, l, e]`` gives the effective
   number of experts ``exp(H)``. A skewed (low-entropy) layer reaches high local coverage with
   few local experts, a flat one needs many, so server n's capacity is split over layers in
   proportion to ``exp(H[n, l])``: integer budgets ``b[n, l]`` with ``sum_l b = capacity[n]``,
   ``1 <= b <= E`` (largest remainders).
2. **Greedy marginal gain.** Copies ``(n, l, e)`` are added in decreasing gain per byte (every
   routed expert has the same size, so gain order). The gain is the objective reduction under
   nearest-replica routing, ``sum_m T[m, l, e] * max(0, d[m, l, e] - tau[m, n])`` with ``d``
   the link time to the nearest current copy (zero when local; ``max_n tau[m, n]`` while the
   expert is hosted nowhere), minus a compute-imbalance penalty
   ``lam * (relu((load[n, l] + moved) * t[n] - Z_l) - relu(load[n, l] * t[n] - Z_l))``
   (``moved``: the traffic the copy attracts, ``Z_l``: the perfectly balanced compute time of
   layer l; slow servers pay more). First copies and replicas compete on the same gain. Rounds
   add one copy to every (server, layer) row with budget left (rows of a layer interact only
   through shared experts and loads), then, with any memory left, one copy per server without
   budgets; at most one copy per expert per round, only positive gains. Gains (almost) only
   fall as copies are added, so each row keeps its candidates sorted and re-evaluates only its
   head (lazy greedy).
3. **Coverage.** Each expert still hosted nowhere, hottest first, goes to free memory if any
   (the server where its gain is largest), else to the server n minimising
   ``loss(x) - gain(n)``, where x is n's cheapest copy that has a replica elsewhere (``loss``:
   the comm cost of dropping it), which is evicted. A cold expert thus lands where memory is
   worth least. (Evictions run in rounds over the hottest remaining experts: a server's k-th
   eviction of a round takes its k-th cheapest copy, for an expert whose second-best server
   would cost more; the other experts wait for the next round.)
4. **Exchange search** (``exchange.py``): pairs of changes no single copy can make (server a
   drops a replica and takes expert z from server b, which adds a new copy in z's slot; or a
   and b swap two copies), applied in rounds while the exact objective falls.
5. **Routing**: the nearest-replica route table (``moe_edge.core.routing``) with the traffic.
6. **Latency refinement** (``refine.py``, off by default; the method ``dancemoe_refined`` has it
   on): steps 1-5 minimise the objective, which counts remote token-choices; the cost model's
   step time also charges one weight read per distinct expert a server uses (replicas on a
   slow-memory server make it the decode bottleneck), a link's latency once per step and the
   busiest NIC. Per layer, copies are pruned (never the last), moved off the bottleneck server
   or added into free memory while the expected layer time of ``cost.expected_cost`` (decode
   and prefill batches, ``refine_phase``) strictly falls; the route table is recomputed after
   every accepted change. It trades the objective for the cost model's latency and takes
   seconds where steps 1-5 take milliseconds (``benchmarks/bench_placement.py``).

Options for ablations: ``entropy_budgets=False`` (no step 1), ``hetero_aware=False`` (the
greedy sees every server at the mean speed and breaks ties by server id; the exchange search's
exact check always uses the real speeds), ``replicas=False`` (every expert exactly once: the
greedy only places first copies and the exchange search only moves and swaps), ``exchange=False``
(no step 4) and ``refine=True`` (step 6).

Why coverage comes last: placing every expert first on the server where it is hottest, then
adding replicas (the obvious order), spends slots of busy servers on cold experts. On 10 seeded
development instances (4 servers, 2 layers, 8 experts, 1.5x memory) that order ended 7.7% above
the ILP optimum on average, this one 0.6% (``benchmarks/bench_placement.py`` reports the gaps).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.routing import route_table
from moe_edge.core.sorting import stable_argsort_desc
from moe_edge.placement.budgets import layer_budgets
from moe_edge.placement.common import finish, greedy_assign
from moe_edge.placement.exchange import exchange_search
from moe_edge.placement.refine import LayerCost, phase_batches
from moe_edge.placement.refine import refine as refine_placement
from moe_edge.placement.registry import PlacementContext, register

_CHUNK = 1024  # columns per block when computing removal losses


class _Greedy:
  """State of steps 2 and 3 (module docstring). Rows are (layer, server): ``hosts``, ``order``
  and ``past`` are ``[L, N, E]``; the per-expert state is column-major ``[L, E, N]``.

  ``d`` is the link time of each (layer, source, expert) to its nearest copy (``far`` while the
  expert is hosted nowhere), ``a`` that copy (-1 while hosted nowhere), ``load [L, N]`` the
  traffic each server computes under this routing, ``c`` the comm gain of a new copy and
  ``delta`` the traffic it would attract; ``c`` and ``delta`` are updated incrementally from the
  sources whose nearest copy changed. Gains (almost) only fall as copies are added, so every
  (layer, server) row keeps its candidates sorted by a past gain and re-evaluates only its head
  (lazy greedy): the head is the row's best when its current gain is at least the next
  candidate's past gain; otherwise the next few candidates, or the whole row, are re-sorted.
  (A gain can rise when a server's load falls and its penalty with it; such rises are only
  seen once the candidate is re-evaluated.)
  """

  def __init__(self, traffic, tau, t, lam, replicas=True):
    n, nl, e = traffic.shape
    self.n_srv, self.n_lay, self.n_exp = n, nl, e
    t_flat = traffic.reshape(n, nl * e).T  # [L*E, source], a transposed view (BLAS-able)
    self.tcol = np.ascontiguousarray(t_flat).reshape(nl, e, n)  # [L, E, source]
    self.hosts = np.zeros((nl, n, e), dtype=bool)
    self.covered = np.zeros((nl, e), dtype=bool)
    self.replicas = replicas
    self.tau, self.t, self.lam = tau, t, lam
    self.far = (np.where(np.eye(n, dtype=bool), -np.inf, tau).max(axis=1) if n > 1
                else np.zeros(1))
    layer_total = self.tcol.sum(axis=(1, 2))
    self.zbal = layer_total / np.sum(1.0 / t)  # [L] balanced compute time
    self.tol = 1e-9 * float(layer_total.max() * tau.max())  # "zero" gain
    # Column-major state [L, E, N] (the updates touch whole columns):
    self.d = np.broadcast_to(self.far[None, None, :], (nl, e, n)).copy()
    self.a = np.full((nl, e, n), -1, dtype=np.int64)
    r = self.far[:, None] - tau  # [source m, new copy n]
    self.c = (t_flat @ np.maximum(r, 0.0)).reshape(nl, e, n)
    self.delta = (t_flat @ (r > 0).astype(np.float64)).reshape(nl, e, n)
    self.load = np.zeros((nl, n))
    g = self.c - self.penalty(np.arange(nl)[:, None, None], np.arange(n)[None, None, :],
                              self.delta)
    g = np.ascontiguousarray(g.transpose(0, 2, 1))  # rows [L, N, E]
    self.order = stable_argsort_desc(g)  # [L, N, E] candidates, best first
    self.past = np.take_along_axis(g, self.order, axis=2)  # their gains when sorted
    self.ptr = np.zeros((nl, n), dtype=np.int64)

  def penalty(self, lk, nk, delta):
    """Compute-imbalance penalty of copies attracting ``delta`` on rows (lk, nk) (broadcast)."""
    if self.lam == 0:
      return np.zeros(np.shape(delta))
    u = self.load[lk, nk] * self.t[nk] - self.zbal[lk]
    return self.lam * (np.maximum(u + delta * self.t[nk], 0.0) - np.maximum(u, 0.0))

  def gain(self, lk, nk, ek):
    """Current gain of copies (lk, nk, ek) (any matching shapes); ``-inf`` if not allowed."""
    g = self.c[lk, ek, nk] - self.penalty(lk, nk, self.delta[lk, ek, nk])
    blocked = self.hosts[lk, nk, ek] if self.replicas else self.covered[lk, ek]
    return np.where(blocked, -np.inf, g)

  def _resort(self, lk, nk):
    """Re-sort rows (lk, nk) by their current gains."""
    e = self.n_exp
    g = self.gain(lk[:, None], nk[:, None], np.arange(e)[None, :])
    order = np.argsort(-g, axis=1, kind="stable")
    self.order[lk, nk] = order
    self.past[lk, nk] = np.take_along_axis(g, order, axis=1)
    self.ptr[lk, nk] = 0

  def heads(self, lk, nk, window=16):
    """Best candidate ``(expert, gain)`` of rows (lk, nk); ``gain = -inf`` when none is left.

    A head whose gain fell below the next past gain is unsettled: the next ``window``
    candidates are re-evaluated and re-sorted, which settles the row when their best is at least
    the past gain after the window; rows that are still unsettled are re-sorted in full.
    """
    e = self.n_exp
    ptr = self.ptr[lk, nk]
    p = np.minimum(ptr, e - 1)
    ek = self.order[lk, nk, p]
    g = np.where(ptr < e, self.gain(lk, nk, ek), -np.inf)
    nxt = np.where(p + 1 < e, self.past[lk, nk, np.minimum(p + 1, e - 1)], -np.inf)
    bad = np.flatnonzero((g < nxt) & (ptr < e))
    if bad.size == 0:
      return ek, g
    bl, bn, bp = lk[bad], nk[bad], p[bad]
    idx = np.minimum(bp[:, None] + np.arange(window)[None, :], e - 1)  # [B, W]
    valid = bp[:, None] + np.arange(window)[None, :] < e
    we = self.order[bl[:, None], bn[:, None], idx]
    wg = np.where(valid, self.gain(bl[:, None], bn[:, None], we), -np.inf)
    after = bp + window
    bound = np.where(after < e, self.past[bl, bn, np.minimum(after, e - 1)], -np.inf)
    ok = wg.max(axis=1) >= bound
    srt = np.argsort(-wg, axis=1, kind="stable")
    we, wg = np.take_along_axis(we, srt, axis=1), np.take_along_axis(wg, srt, axis=1)
    o = np.flatnonzero(ok)
    keep = valid[o]  # write back only real positions (the window is left-aligned: a prefix)
    rows_o = np.broadcast_to(o[:, None], keep.shape)[keep]
    pos = idx[o][keep]
    self.order[bl[rows_o], bn[rows_o], pos] = we[o][keep]
    self.past[bl[rows_o], bn[rows_o], pos] = wg[o][keep]
    if (~ok).any():
      self._resort(bl[~ok], bn[~ok])
    ek[bad] = self.order[bl, bn, np.where(ok, bp, 0)]
    g[bad] = self.past[bl, bn, np.where(ok, bp, 0)]
    return ek, g

  def add(self, lk, nk, ek):
    """Add copies (lk, nk, ek) (distinct columns) and update every derived quantity."""
    n = self.n_srv
    old_a, old_d = self.a[lk, ek], self.d[lk, ek]  # [K, N]
    self.hosts[lk, nk, ek] = True
    self.covered[lk, ek] = True
    kk, mm = np.nonzero(self.tau[:, nk].T < old_d)  # sources now closer, grouped by copy
    lp, ep, np_ = lk[kk], ek[kk], nk[kk]
    tp = self.tcol[lp, ep, mm]
    src = old_a[kk, mm]
    away = src >= 0
    self.load += np.bincount(np.concatenate([lp[away] * n + src[away], lp * n + np_]),
                             weights=np.concatenate([-tp[away], tp]),
                             minlength=self.load.size).reshape(self.load.shape)
    d_old, d_new = old_d[kk, mm], self.tau[mm, np_]
    self.d[lp, ep, mm], self.a[lp, ep, mm] = d_new, np_
    # c[n] = sum_m T[m] relu(d[m] - tau[m, n]): add each moved source's change, for every n.
    if kk.size == 0:
      return
    # relu(d_new - x) - relu(d_old - x) = -clip(d_old - x, 0, d_old - d_new), x = tau[m, n]:
    # nonzero only for the servers n closer to m than its old copy (few), so go sparse.
    pi, ni = np.nonzero(self.tau[mm] < d_old[:, None])  # [P, N] -> pairs (source, server)
    x = self.tau[mm[pi], ni]
    dc = -tp[pi] * np.minimum(d_old[pi] - x, d_old[pi] - d_new[pi])
    cell = kk[pi] * n + ni
    k = lk.size
    self.c[lk, ek] += np.bincount(cell, weights=dc, minlength=k * n).reshape(k, n)
    if self.lam:  # delta loses the sources with d_new <= x < d_old
      dd = np.where(x >= d_new[pi], -tp[pi], 0.0)
      self.delta[lk, ek] += np.bincount(cell, weights=dd, minlength=k * n).reshape(k, n)

  def fill(self, room, budget_left=None):
    """Greedy rounds until no positive gain fits; returns copies added. Modifies ``room``.

    With ``budget_left [L, N]``: every (layer, server) row with budget left adds its best copy
    each round. Without: every server adds its best copy each round. At most one copy per
    expert per round (the best server wins) and at most ``room`` per server (best first).
    """
    added = 0
    n_lay, n = self.ptr.shape
    n_exp = self.n_exp
    while True:
      ok = np.broadcast_to(room[None, :] > 0, (n_lay, n))
      if budget_left is not None:
        ok = ok & (budget_left > 0)
      lk, nk = np.nonzero(ok)
      ek, val = self.heads(lk, nk)
      if budget_left is None:  # one candidate per server: its best row
        best = np.full(n, -np.inf)
        np.maximum.at(best, nk, val)
        first = np.zeros(lk.size, dtype=bool)
        top = np.flatnonzero(val == best[nk])
        first[top[np.unique(nk[top], return_index=True)[1]]] = True
        lk, nk, ek, val = lk[first], nk[first], ek[first], val[first]
      pick = val > self.tol
      if not pick.any():
        return added
      lk, nk, ek, val = lk[pick], nk[pick], ek[pick], val[pick]
      order = np.lexsort((nk, lk, -val))  # best first
      lk, nk, ek = lk[order], nk[order], ek[order]
      keep = np.zeros(lk.size, dtype=bool)
      keep[np.unique(lk * n_exp + ek, return_index=True)[1]] = True  # one per expert
      by_srv = np.argsort(nk, kind="stable")  # a server takes at most its room
      nth = np.empty_like(nk)
      nth[by_srv] = np.arange(nk.size) - np.searchsorted(nk[by_srv], nk[by_srv])
      keep &= nth < room[nk]
      lk, nk, ek = lk[keep], nk[keep], ek[keep]
      self.add(lk, nk, ek)
      self.ptr[lk, nk] += 1
      np.subtract.at(room, nk, 1)
      if budget_left is not None:
        budget_left[lk, nk] -= 1
      added += lk.size

  def removal_loss(self, lk, ek):
    """``[K, N]`` comm cost of dropping each copy of columns (lk, ek) (inf: not removable)."""
    h = self.hosts[lk, :, ek]  # [K, N]
    k, n = h.shape
    r = max(int(h.sum(axis=1).max()), 2)
    copies = np.argsort(~h, axis=1, kind="stable")[:, :r]  # [K, R] hosts first
    real = np.take_along_axis(h, copies, axis=1)
    dm = np.where(real[:, None, :], self.tau[:, copies].transpose(1, 0, 2), np.inf)  # [K, m, R]
    first = dm.argmin(axis=2)[..., None]
    near = np.take_along_axis(copies[:, None, :], first, axis=2)[..., 0]
    d1 = np.take_along_axis(dm, first, axis=2)[..., 0]
    np.put_along_axis(dm, first, np.inf, axis=2)
    d2 = dm.min(axis=2)  # the second nearest copy
    with np.errstate(invalid="ignore"):  # inf - inf where a column has one copy; masked below
      extra = np.where(np.isfinite(d2), self.tcol[lk, ek] * (d2 - d1), 0.0)  # [K, source]
    rows = np.repeat(np.arange(k), n)
    loss = np.bincount(rows * n + near.ravel(), weights=extra.ravel(),
                       minlength=h.size).reshape(h.shape)
    return np.where(h & (h.sum(axis=1, keepdims=True) >= 2), loss, np.inf)

  def cover(self, room, hotness):
    """Step 3: host every expert hosted nowhere, hottest first (module docstring).

    Returns (copies placed in free room, copies placed by eviction).
    """
    nl, n, e = self.hosts.shape
    lu, eu = np.nonzero(~self.covered)
    if lu.size == 0:
      return 0, 0
    order = np.argsort(-hotness[lu, eu], kind="stable")
    lu, eu = lu[order], eu[order]
    gain = self.c[lu, eu] - self.penalty(lu[:, None], np.arange(n)[None, :],
                                         self.delta[lu, eu])  # [U, N]
    free = min(int(room.sum()), lu.size)
    if free:
      owner = greedy_assign(-gain[:free], np.arange(free), room)
      self.hosts[lu[:free], owner, eu[:free]] = True
      np.subtract.at(room, owner, 1)
    if free == lu.size:
      return free, 0
    # Evictions, in rounds: loss[n, j] of server n's j-th copy (inf unless another copy exists).
    cn, cl, ce = np.nonzero(self.hosts.transpose(1, 0, 2))
    slot = np.concatenate([[0], np.cumsum(np.bincount(cn, minlength=n))])
    j = np.arange(cn.size) - slot[cn]
    width = int(j.max()) + 1
    loss = np.full((n, width), np.inf)
    copy_l = np.zeros((n, width), dtype=np.int64)
    copy_e = np.zeros((n, width), dtype=np.int64)
    copy_l[cn, j], copy_e[cn, j] = cl, ce
    where = np.full((nl, n, e), -1, dtype=np.int64)
    where[cl, cn, ce] = j
    count = self.hosts.sum(axis=1)

    def refresh(cols_l, cols_e):
      copies = count[cols_l, cols_e]
      for r in np.unique(copies):  # blocks of equal copy counts: no padding
        bl_all, be_all = cols_l[copies == r], cols_e[copies == r]
        step = max(1, _CHUNK * 8 // int(r))
        for s in range(0, bl_all.size, step):
          bl, be = bl_all[s:s + step], be_all[s:s + step]
          lo = self.removal_loss(bl, be)  # [K, N]
          kk, nn = np.nonzero(self.hosts[bl, :, be])
          loss[nn, where[bl[kk], nn, be[kk]]] = lo[kk, nn]

    refresh(*np.nonzero(count >= 2))
    pending = np.arange(free, lu.size)  # hottest first
    while pending.size:
      # Each server's q cheapest copies; an orphan takes the k-th cheapest of its best server
      # when it is the k-th orphan choosing that server and that still beats its second choice.
      q = min(32, width)
      part = np.argpartition(loss, q - 1, axis=1)[:, :q] if width > q else np.tile(
          np.arange(width), (n, 1))
      srt = np.argsort(np.take_along_axis(loss, part, axis=1), axis=1, kind="stable")
      cheap_j = np.take_along_axis(part, srt, axis=1)  # [N, q]
      cheap = np.take_along_axis(loss, cheap_j, axis=1)
      head = pending[:q * n]  # the hottest orphans: at most q per server can go this round
      score = cheap[None, :, 0] - gain[head]  # [P, N]
      srv = np.argmin(score, axis=1)
      score[np.arange(srv.size), srv] = np.inf
      second = score.min(axis=1)  # the orphan's cost on its second-best server
      by_srv = np.argsort(srv, kind="stable")
      rank = np.empty_like(srv)
      rank[by_srv] = np.arange(srv.size) - np.searchsorted(srv[by_srv], srv[by_srv])
      rk = np.minimum(rank, q - 1)
      victim_loss = cheap[srv, rk]
      ok = (rank < q) & np.isfinite(victim_loss) & (
          (rank == 0) | (victim_loss - gain[head, srv] <= second))
      take, srv, vj = head[ok], srv[ok], cheap_j[srv[ok], rk[ok]]
      vl, ve = copy_l[srv, vj], copy_e[srv, vj]
      # A column keeps at least one copy: at most count - 1 of its copies go per round.
      key = vl * e + ve
      by_key = np.argsort(key, kind="stable")
      nth = np.empty_like(key)
      nth[by_key] = np.arange(key.size) - np.searchsorted(key[by_key], key[by_key])
      ok = nth < count[vl, ve] - 1
      take, srv, vj, vl, ve = take[ok], srv[ok], vj[ok], vl[ok], ve[ok]
      self.hosts[vl, srv, ve] = False
      np.subtract.at(count, (vl, ve), 1)
      loss[srv, vj] = np.inf
      self.hosts[lu[take], srv, eu[take]] = True
      count[lu[take], eu[take]] = 1
      copy_l[srv, vj], copy_e[srv, vj] = lu[take], eu[take]  # the new copy: never removable
      where[lu[take], srv, eu[take]] = vj
      refresh(*np.divmod(np.unique(vl * e + ve), e))  # the evicted columns, once each
      pending = np.setdiff1d(pending, take, assume_unique=True)
    self.covered[:] = True
    return free, lu.size - free


@dataclasses.dataclass(frozen=True)
class DanceMoEOptions:
  """Options of :func:`dancemoe` and :func:`dancemoe_refined` (module docstring).

  Attributes:
    lam: weight of the load-balance term of the objective (``objective.py``).
    entropy_budgets: split each server's memory over layers by activation entropy first.
    hetero_aware: use each server's own compute speed (else the mean) and prefer faster servers
      on equal gains.
    replicas: add replicas (else every expert exactly once).
    route_slack: the ``slack`` of the nearest-replica route.
    exchange: step 4, the exchange local search on the objective (``exchange.py``).
    exchange_rounds: at most this many exchange rounds.
    exchange_max_size: the exchange search runs only when ``N * N * L * E`` is at most this (it
      keeps the move value of every copy to every server); larger instances skip it and say so
      in ``info``.
    refine: step 6, the latency refinement (``refine.py``) on the problem's hardware: prune,
      move and add copies where the cost model's expected layer time falls. None: the method's
      default (``dancemoe`` off, ``dancemoe_refined`` on).
    refine_phase: what the refinement minimises: ``"decode"``, ``"prefill"`` or ``"both"``
      (each phase's summed layer time relative to its value before refinement, weighted 1:1).
    decode_tokens, prefill_tokens: tokens per server in one decode / prefill step (scaled by
      each server's relative request rate ``problem.tokens / mean``); None: the context's
      workload summary (``decode_batch``, ``prefill_tokens`` per server), else 8 and 128.
    refine_rounds: at most this many refinement rounds (one change per layer each).
    refine_max_size: the refinement runs only when ``N * L * E`` is at most this (its
      candidates cost ``O(N^2)`` each); larger instances skip it and say so in ``info``.
  """
  lam: float = 1.0
  entropy_budgets: bool = True
  hetero_aware: bool = True
  replicas: bool = True
  route_slack: float = 0.1
  exchange: bool = True
  exchange_rounds: int = 16
  exchange_max_size: int = 1 << 24
  refine: bool | None = None
  refine_phase: str = "both"
  decode_tokens: float | None = None
  prefill_tokens: float | None = None
  refine_rounds: int = 64
  refine_max_size: int = 1 << 16


@register("dancemoe", "ours", DanceMoEOptions, label="DanceMoE")
def dancemoe(problem: PlacementProblem, options: DanceMoEOptions = DanceMoEOptions(),
             context: PlacementContext = PlacementContext()) -> Placement:
  """Activation-aware placement on the objective (module docstring); deterministic."""
  o = options
  lam, replicas, route_slack, refine = o.lam, o.replicas, o.route_slack, bool(o.refine)
  hetero_aware, exchange = o.hetero_aware, o.exchange
  if lam < 0:
    raise PlacementError(f"lam={lam}: the load-balance weight must be >= 0.")
  start = time.perf_counter()
  n, l, e = problem.shape
  t = problem.hardware.compute_time_per_token()
  if not hetero_aware:
    t = np.full(n, t.mean())
  perm = np.argsort(t, kind="stable") if hetero_aware else np.arange(n)  # fastest first
  traffic = problem.traffic[perm]
  tau = problem.hardware.link_time_per_token()[np.ix_(perm, perm)]
  t = t[perm]
  room = problem.capacity[perm].astype(np.int64).copy()
  info = dict(seed=context.seed, lam=lam, entropy_budgets=o.entropy_budgets,
              hetero_aware=hetero_aware, replicas=replicas, exchange=exchange, refine=refine,
              refine_phase=o.refine_phase)
  if refine:
    batch, weight = phase_batches(problem, o.refine_phase, o.decode_tokens, o.prefill_tokens,
                                  context.workload)

  phase_s = {}
  tick = time.perf_counter()
  greedy = _Greedy(traffic, tau, t, lam, replicas)
  phase_s["init"], tick = time.perf_counter() - tick, time.perf_counter()
  in_budget = 0
  if o.entropy_budgets:
    budget = layer_budgets(problem.freq[perm], room)
    in_budget = greedy.fill(room, np.ascontiguousarray(budget.T))
    info["budget_mean_per_layer"] = budget.mean(axis=0).round(2).tolist()
  free = greedy.fill(room)
  phase_s["greedy"], tick = time.perf_counter() - tick, time.perf_counter()
  in_room, evicted = greedy.cover(room, traffic.sum(axis=0))
  phase_s["cover"] = time.perf_counter() - tick
  hosts = greedy.hosts.transpose(1, 0, 2)
  info.update(copies_in_budget=int(in_budget), copies_free=int(free),
              coverage_in_room=in_room, coverage_by_eviction=evicted, phase_s=phase_s)
  out = np.empty_like(hosts)
  out[perm] = hosts
  route = None
  if exchange and n * n * l * e > o.exchange_max_size:
    info["exchange_skipped"] = (f"N*N*L*E = {n * n * l * e:,} > exchange_max_size = "
                                f"{o.exchange_max_size:,}")
  elif exchange:
    tick = time.perf_counter()
    out, route, info["exchange_stats"] = exchange_search(problem, out, lam, route_slack,
                                                         o.exchange_rounds, adds=replicas)
    phase_s["exchange"] = time.perf_counter() - tick
  if refine and n * l * e > o.refine_max_size:
    info["refine_skipped"] = f"N*L*E = {n * l * e:,} > refine_max_size = {o.refine_max_size:,}"
  elif refine:
    tick = time.perf_counter()
    out, route, stats = refine_placement(problem, out, _phase_cost(problem, out, batch, weight,
                                                                   route_slack),
                                         route_slack, o.refine_rounds, adds=replicas)
    phase_s["refine"] = time.perf_counter() - tick
    info["refine_stats"] = stats
  return finish(problem, out, "dancemoe", start, info, route=route, lam=lam, slack=route_slack)


@register("dancemoe_refined", "ours", DanceMoEOptions, label="DanceMoE-refined")
def dancemoe_refined(problem: PlacementProblem, options: DanceMoEOptions = DanceMoEOptions(),
                     context: PlacementContext = PlacementContext()) -> Placement:
  """DanceMoE with the latency refinement (step 6) on: ``dancemoe`` with ``refine=True``."""
  if options.refine is not None:
    raise PlacementError("dancemoe_refined always refines; leave the option refine unset (use "
                         "dancemoe with refine=True/False to choose).")
  p = dancemoe(problem, dataclasses.replace(options, refine=True), context)
  return dataclasses.replace(p, method="dancemoe_refined")


def _phase_cost(problem: PlacementProblem, hosts: np.ndarray, batch: np.ndarray,
                weight: np.ndarray, slack: float) -> LayerCost:
  """The refinement's layer-time model, each phase normalised by its summed layer time on
  ``hosts`` (so ``"both"`` weighs relative changes of decode and prefill equally)."""
  cost = LayerCost.build(problem, batch, weight)
  route = route_table(hosts, problem.hardware, problem.traffic, slack)
  total = cost.phase_times(route, hosts=hosts).sum(axis=1)
  return dataclasses.replace(cost, weight=np.where(total > 0, weight / np.where(
      total > 0, total, 1.0), 0.0))
