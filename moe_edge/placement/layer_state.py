r"""Per-layer expected step cost of a placement, with exact incremental evaluation of changes.

The cost model's expected step (``CostModel.expected``; formulas in ``moe_edge/cost/model.py``
and ``Hardware``) is, for each phase ``p`` (decode, prefill) with ``x[p, n, l, e] = batch[p, n]
* freq[n, l, e]`` expected token-choices::

  on[p, l, m, e]  = sum_{n : route[n, l, e] = m} x[p, n, l, e]
  C[p, l, n, m]   = sum_{e : route[n, l, e] = m != n} x[p, n, l, e]
  U[p, l, m]      = sum_e hw.expert_time(on, expected=True)   (a grouped kernel's time)
  R[p, l, m]      = sum_e on[p, l, m, e];  G[l, m] = sum_e hosts[m, l, e]
  P[p, l, m]      = hw.compute_time(U, R, G, expected=True)  (U, or dense over held slots)
  time[p, l]      = dispatch + combine (hw.exchange_times(C, used = 1 - exp(-C))) + max_m P
  T[p]            = hw.dense_time(batch[p]) + sum_l time[p, l]

Layers are independent given the batch, and a change of one expert's copies ``(l, e)`` (its
host column and, with it, its route column) changes only that column's ``on`` and that layer's
``C``: :meth:`LayerState.evaluate` prices ``K`` candidate column changes at once, exactly, in
``O(P K N^2)``; :meth:`LayerState.screen` estimates them in ``O(P K N)`` (expert compute and
every server's send and receive bytes exact, the link latency terms left as they are) to pick
which to price; :meth:`LayerState.apply` commits one, updating the caches by the column's change.
Every time goes through ``Hardware`` (the screening's estimate alone reads its coefficients);
``tests/placement/test_search.py`` checks that :meth:`LayerState.step_times` equals
``CostModel.expected`` and that committed changes cost what :meth:`evaluate` priced.

Routing of a changed column (:meth:`LayerState.reroute`): a source holding the expert serves
itself; a source whose copy was removed goes to the remaining copy with the least
``hw.route_cost()`` (link time there and back plus the copy's compute per token; ties to the
lower server id); the others keep their copy unless an added one is cheaper. Unchanged columns
keep the route they came with (a start's own route table).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.core.errors import PlacementError

_BLOCK = 1 << 22  # candidate-entries (K * N * N) per evaluation block


def nearest_route(h: np.ndarray, route_cost: np.ndarray) -> np.ndarray:
  """``[K, N]`` route of host columns ``h [K, N]``: local if held, else the cheapest copy."""
  n = h.shape[1]
  cost = np.where(h[:, None, :], route_cost[None], np.inf)           # [K, S, M]
  best = np.argmin(cost, axis=2)
  return np.where(h, np.arange(n)[None, :], best).astype(np.int64)


@dataclasses.dataclass
class LayerState:
  """Mutable search state: hosts, route and the per-layer expected costs (module docstring).

  Attributes:
    hw: the ``Hardware`` of the problem.
    x: ``[P, N, L, E]`` expected token-choices per step of each phase.
    dense: ``[P]`` dense seconds of each phase's step.
    route_cost: ``[N, M]`` ``hw.route_cost()``.
    hosts: ``[N, L, E]`` bool; route: ``[N, L, E]`` int64.
    on: ``[P, L, M, E]``; flows: ``[P, L, N, M]``; time: ``[P, L]``.
    per: ``[P, L, M]`` the per-used-expert sum ``U``; rows: ``[P, L, M]`` ``R`` (module
      docstring; a server's compute is ``hw.compute_time(per, rows, held)``).
    row, col: ``[P, L, N]`` each server's dispatch and combine terms (the screening's cache).
    rank: ``[N, M]`` int16, position of m in n's order of preference (itself first, then by
      ``route_cost``, ties to the lower id).
  """
  hw: object
  x: np.ndarray
  dense: np.ndarray
  route_cost: np.ndarray
  hosts: np.ndarray
  route: np.ndarray
  on: np.ndarray = None
  flows: np.ndarray = None
  per: np.ndarray = None
  rows: np.ndarray = None
  time: np.ndarray = None
  row: np.ndarray = None
  col: np.ndarray = None
  rank: np.ndarray = None

  @classmethod
  def build(cls, hw, freq: np.ndarray, batches: np.ndarray, hosts: np.ndarray,
            route: np.ndarray) -> "LayerState":
    """State of ``hosts``/``route [N, L, E]`` for ``batches [P, N]`` tokens per server."""
    batches = np.asarray(batches, dtype=np.float64)
    x = batches[:, :, None, None] * np.asarray(freq, dtype=np.float64)[None]
    dense = np.array([hw.dense_time(b) for b in batches], dtype=np.float64)
    rc = hw.route_cost()
    key = np.where(np.eye(rc.shape[0], dtype=bool), -np.inf, rc)       # local first
    rank = np.argsort(np.argsort(key, axis=1, kind="stable"), axis=1,
                      kind="stable").astype(np.int16)
    st = cls(hw, x, dense, rc, np.array(hosts, dtype=bool), np.array(route, dtype=np.int64),
             rank=rank)
    st.refresh(np.arange(hosts.shape[1]))
    return st

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.hosts.shape

  def step_times(self) -> np.ndarray:
    """``[P]`` expected step seconds, ``dense + sum_l time``."""
    return self.dense + self.time.sum(axis=1)

  def _layer_arrays(self, layers: np.ndarray):
    """``(on, flows)`` of ``layers [L']`` recomputed from the route table."""
    p, n, _, e = self.x.shape
    r = self.route[:, layers]                                          # [N, L', E]
    lp = len(layers)
    x = self.x[:, :, layers]                                           # [P, N, L', E]
    li = np.arange(lp)[None, :, None]
    on_idx = ((li * n + r) * e + np.arange(e)[None, None, :]).ravel()
    fl_idx = ((li * n + np.arange(n)[:, None, None]) * n + r).ravel()
    on = np.stack([np.bincount(on_idx, x[q].ravel(), lp * n * e) for q in range(p)])
    flows = np.stack([np.bincount(fl_idx, x[q].ravel(), lp * n * n) for q in range(p)])
    flows = flows.reshape(p, lp, n, n) * (1.0 - np.eye(n))
    return on.reshape(p, lp, n, e), flows

  def held(self, layers: np.ndarray) -> np.ndarray:
    """``[L', M]`` slots each server holds in ``layers [L']``."""
    return self.hosts[:, layers].sum(axis=-1).T

  def compute(self, per: np.ndarray, rows: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``[..., M]`` expert compute seconds of each server from the per-used-expert sums
    ``per``, ``rows`` and ``held`` slots (``hw.compute_time`` on expected counts)."""
    return self.hw.compute_time(per, rows, held, server_axis=-1, expected=True)

  def layer_times(self, on: np.ndarray, flows: np.ndarray, held: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(per [..., M], rows [..., M], time [...])`` of ``on [..., M, E]``, ``flows [..., N,
    M]`` and ``held [..., M]`` slots."""
    per = self.hw.expert_time(on, server_axis=-2, expected=True).sum(axis=-1)
    rows = on.sum(axis=-1)
    disp, comb = self.hw.exchange_times(flows, -np.expm1(-flows))
    return per, rows, disp + comb + self.compute(per, rows, held).max(axis=-1)

  def refresh(self, layers: np.ndarray) -> None:
    """Recompute the cached costs of ``layers`` from ``hosts``/``route``."""
    layers = np.asarray(layers, dtype=np.int64)
    on, flows = self._layer_arrays(layers)
    per, rows, time = self.layer_times(on, flows, self.held(layers))
    row, col = self._row_col(flows)
    if self.on is None:
      self.on, self.flows, self.per, self.rows, self.time, self.row, self.col = (
          on, flows, per, rows, time, row, col)
      return
    self.on[:, layers], self.flows[:, layers] = on, flows
    self.per[:, layers], self.rows[:, layers], self.time[:, layers] = per, rows, time
    self.row[:, layers], self.col[:, layers] = row, col

  def _row_col(self, flows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each server's dispatch (send bytes time plus its slowest used link's latency) and
    combine terms ``[..., N]`` of ``flows [..., N, M]``: the screening's cache (the maxima of
    these are what ``hw.exchange_times`` returns)."""
    hw = self.hw
    used = -np.expm1(-flows)
    row = np.einsum("...nm,nm->...n", flows, hw.act * hw.inv_bw) + (used * hw.lat).max(-1)
    col = np.einsum("...nm,mn->...m", flows, hw.act * hw.inv_bw) + (used * hw.lat.T).max(-2)
    return row, col

  def reroute(self, lk: np.ndarray, ek: np.ndarray, hk: np.ndarray) -> np.ndarray:
    """``[K, N]`` route of column ``(lk, ek)`` with new hosts ``hk [K, N]`` (module docstring):
    sources whose copy was removed go to their nearest remaining copy, the others keep theirs
    unless an added copy is nearer (or local)."""
    old = self.route[:, lk, ek].T                                      # [K, N]
    h0 = self.hosts[:, lk, ek].T
    removed, added = h0 & ~hk, hk & ~h0
    new = old.copy()
    kk, nn = np.nonzero(np.take_along_axis(removed, old, axis=1))
    if kk.size:
      far = np.iinfo(self.rank.dtype).max
      new[kk, nn] = np.argmin(np.where(hk[kk], self.rank[nn], far), axis=1)
    if added.any():
      a = np.argmax(added, axis=1)
      src = np.arange(self.shape[0])[None, :]
      better = added.any(axis=1)[:, None] & (self.rank[src, a[:, None]] < self.rank[src, new])
      new = np.where(better, a[:, None], new)
    return new

  def screen(self, lk: np.ndarray, ek: np.ndarray, hk: np.ndarray,
             e2: np.ndarray | None = None, h2: np.ndarray | None = None) -> np.ndarray:
    """``[P, K]`` approximate layer times after candidate changes, in ``O(P K N)``.

    Expert compute is exact; the exchange keeps every link's latency term as it is and moves
    only the bytes (each server's send and receive sums), so the estimate ranks candidates for
    :meth:`evaluate`, which is exact. Arguments as :meth:`evaluate`.
    """
    per, rows, row, col = self._screen_terms(lk, ek, hk)
    held = self._held_after(lk, ek, hk)
    if e2 is not None:
      two = np.flatnonzero(e2 >= 0)
      if two.size:
        p2, n2, r2, c2 = self._screen_terms(lk[two], e2[two], h2[two])
        per[:, two] += p2 - self.per[:, lk[two]]
        rows[:, two] += n2 - self.rows[:, lk[two]]
        row[:, two] += r2 - self.row[:, lk[two]]
        col[:, two] += c2 - self.col[:, lk[two]]
        held[two] += h2[two].astype(np.int64) - self.hosts[:, lk[two], e2[two]].T
    return row.max(axis=-1) + col.max(axis=-1) + self.compute(per, rows, held).max(axis=-1)

  def _held_after(self, lk: np.ndarray, ek: np.ndarray, hk: np.ndarray) -> np.ndarray:
    """``[K, M]`` slots held in layer ``lk[k]`` after column ``(lk, ek)`` becomes ``hk``."""
    return (self.held(lk) - self.hosts[:, lk, ek].T + hk).astype(np.int64)

  def _screen_terms(self, lk, ek, hk):
    """Screened ``(per, rows, row, col)`` ``[P, K, N]`` of single-column changes."""
    hw = self.hw
    k, n = hk.shape
    old = self.route[:, lk, ek].T
    new = self.reroute(lk, ek, hk)
    xk = self.x[:, :, lk, ek].transpose(0, 2, 1)                       # [P, K, N]
    base = (np.arange(k) * n)[:, None]
    src = np.broadcast_to(np.arange(n)[None, :], (k, n))
    on_old = self.on[:, lk, :, ek].transpose(1, 0, 2)                  # [P, K, M]
    per, rows, row, col = [], [], [], []
    for q in range(xk.shape[0]):
      w = xk[q]
      d_on = (np.bincount((base + new).ravel(), w.ravel(), k * n)
              - np.bincount((base + old).ravel(), w.ravel(), k * n)).reshape(k, n)
      on_new = np.maximum(on_old[q] + d_on, 0.0)
      t = lambda c: hw.expert_time(c, server_axis=-1, expected=True)  # noqa: E731
      per.append(self.per[q, lk] - t(on_old[q]) + t(on_new))
      rows.append(self.rows[q, lk] - on_old[q] + on_new)
      row.append(self.row[q, lk] + hw.act * w * (hw.inv_bw[src, new] - hw.inv_bw[src, old]))
      back = (np.bincount((base + new).ravel(), (w * hw.inv_bw[new, src]).ravel(), k * n)
              - np.bincount((base + old).ravel(), (w * hw.inv_bw[old, src]).ravel(), k * n))
      col.append(self.col[q, lk] + hw.act * back.reshape(k, n))
    return np.stack(per), np.stack(rows), np.stack(row), np.stack(col)

  def evaluate(self, lk: np.ndarray, ek: np.ndarray, hk: np.ndarray,
               e2: np.ndarray | None = None, h2: np.ndarray | None = None) -> np.ndarray:
    """``[P, K]`` exact layer times after candidate changes (module docstring).

    Candidate ``k`` sets expert ``ek[k]`` of layer ``lk[k]`` to host column ``hk[k] [N]``
    (re-routed by :meth:`reroute`) and, where ``e2[k] >= 0``, expert ``e2[k]`` of the same layer
    to ``h2[k]`` too (a two-column change: swaps). Nothing is modified.
    """
    k = lk.size
    n = self.shape[0]
    out = np.empty((self.x.shape[0], k))
    step = max(1, _BLOCK // (n * n))
    for a in range(0, k, step):
      s = slice(a, min(k, a + step))
      out[:, s] = self._evaluate_block(lk[s], ek[s], hk[s], None if e2 is None else e2[s],
                                       None if h2 is None else h2[s])
    return out

  def _column_delta(self, lk, ek, hk):
    """Old and new ``on`` columns ``[P, K, M]`` and the flow change ``[P, K, N, M]``."""
    n = self.shape[0]
    eye = np.eye(n)
    old = self.route[:, lk, ek].T                                      # [K, N]
    new = self.reroute(lk, ek, hk)
    xk = self.x[:, :, lk, ek].transpose(0, 2, 1)                       # [P, K, N]
    d = eye[new] - eye[old]                                            # [K, N, M]
    on_old = self.on[:, lk, :, ek].transpose(1, 0, 2)                  # [P, K, M]
    on_new = on_old + np.einsum("pkn,knm->pkm", xk, d)
    dflow = xk[..., None] * (d * (1.0 - eye))[None]
    return on_old, np.maximum(on_new, 0.0), dflow

  def _evaluate_block(self, lk, ek, hk, e2, h2):
    on_old, on_new, dflow = self._column_delta(lk, ek, hk)
    t = lambda c: self.hw.expert_time(c, server_axis=-1, expected=True)  # noqa: E731
    per = self.per[:, lk] - t(on_old) + t(on_new)
    rows = self.rows[:, lk] - on_old + on_new
    held = self._held_after(lk, ek, hk)
    flows = self.flows[:, lk] + dflow
    if e2 is not None:
      two = np.flatnonzero(e2 >= 0)
      if two.size:
        o2, n2, f2 = self._column_delta(lk[two], e2[two], h2[two])
        per[:, two] += t(n2) - t(o2)
        rows[:, two] += n2 - o2
        held[two] += h2[two].astype(np.int64) - self.hosts[:, lk[two], e2[two]].T
        flows[:, two] += f2
    flows = np.maximum(flows, 0.0)
    disp, comb = self.hw.exchange_times(flows, -np.expm1(-flows))
    return disp + comb + self.compute(per, rows, held).max(axis=-1)

  def apply(self, layer: int, experts: list[int], columns: list[np.ndarray],
            refresh: bool = True) -> None:
    """Set host columns of ``experts`` in ``layer`` (re-routed by :meth:`reroute`) and update
    the layer's cached ``on``, ``flows`` and ``per`` by the columns' changes; then recompute its
    times (``refresh=False``: the caller calls :meth:`settle` on the changed layers once)."""
    n = self.shape[0]
    eye = np.eye(n)
    for e, h in zip(experts, columns):
      h = np.asarray(h, dtype=bool)
      if not h.any():
        raise PlacementError(f"layer {layer} expert {e} would be hosted nowhere.")
      old = self.route[:, layer, e].copy()
      new = self.reroute(np.array([layer]), np.array([e]), h[None])[0]
      x = self.x[:, :, layer, e]                                       # [P, N]
      d = eye[new] - eye[old]                                          # [N, M]
      on_old = self.on[:, layer, :, e].copy()
      self.on[:, layer, :, e] = np.maximum(on_old + x @ d, 0.0)
      t = self.hw.expert_time
      self.per[:, layer] += (t(self.on[:, layer, :, e], server_axis=-1, expected=True)
                             - t(on_old, server_axis=-1, expected=True))
      self.rows[:, layer] += self.on[:, layer, :, e] - on_old
      self.flows[:, layer] = np.maximum(
          self.flows[:, layer] + x[:, :, None] * (d * (1.0 - eye))[None], 0.0)
      self.route[:, layer, e] = new
      self.hosts[:, layer, e] = h
    if refresh:
      self.settle(np.array([layer]))

  _CACHED = ("hosts", "route", "on", "flows", "per", "rows", "time", "row", "col")

  def snapshot(self, layers: np.ndarray) -> tuple:
    """Copies of everything :meth:`apply` changes in ``layers`` (every cached array has the
    layer axis second), for :meth:`restore`."""
    return tuple(getattr(self, f)[:, layers].copy() for f in self._CACHED)

  def restore(self, layers: np.ndarray, snap: tuple) -> None:
    """Undo changes of ``layers`` made since :meth:`snapshot`."""
    for f, v in zip(self._CACHED, snap):
      getattr(self, f)[:, layers] = v

  def settle(self, layers: np.ndarray) -> None:
    """Recompute the times of ``layers`` from the cached ``flows``, ``per`` and ``rows``."""
    layers = np.asarray(layers, dtype=np.int64)
    flows, per = self.flows[:, layers], self.per[:, layers]
    compute = self.compute(per, self.rows[:, layers], self.held(layers))
    disp, comb = self.hw.exchange_times(flows, -np.expm1(-flows))
    self.time[:, layers] = disp + comb + compute.max(axis=-1)
    self.row[:, layers], self.col[:, layers] = self._row_col(flows)
