r"""A facility-location LP that bounds one phase's expected step time over every placement.

The coupled bound of ``bounds.py`` keeps, per server, how many of its own choices it serves
locally, but not *where* the others go, so it cannot see that a remote choice must reach a
server holding the expert, that far links carry what near ones cannot hold, or that a slow
server pays to read what it hosts. This LP keeps all three. For one phase (``x[n, l, e]``
expected token-choices per step, as in ``layer_state.py``) and every layer ``l`` and expert
``e``:

* ``h[m, l, e] in [0, 1]``: ``m`` hosts ``(l, e)``; ``sum_m h >= 1`` (every expert hosted) and
  ``sum_{l, e} h[m, l, e] <= C[m]`` (memory);
* ``z[n, m, l, e] in [0, 1]`` (``n != m``): the share of ``n``'s choices of ``(l, e)`` served on
  ``m``; ``z <= h[m, l, e]`` and ``h[n, l, e] + sum_m z[n, m, l, e] = 1`` (a holder serves its
  own choices locally, every other choice goes to a holder: the rules ``Placement`` enforces);
* ``on[m, l, e] = x[m] h[m] + sum_n x[n] z[n, m]`` choices computed on ``m`` and ``C[n, m, l] =
  sum_e x[n] z[n, m]`` remote choices per link.

Each cost term is replaced by linear functions below it at every placement (where ``h`` and
``z`` are 0 or 1), so the LP's minimum is a lower bound of the step (``dense`` added exactly):

* **Expert compute** ``max(read (1 - exp(-on)), on flop)`` (``hw.expert_time``, expected) is at
  least ``t[m, l, e]``, the maximum of four linear functions: ``on flop``; the chord from the
  origin ``read (1 - exp(-X)) / X on`` (``X = sum_n x[n]``, the most ``on`` can be; the read
  term is concave); the chord from ``x[m]`` to ``X``, ``T(x[m]) h + alpha (on - x[m] h)`` (a
  holder computes at least its own choices, so ``on`` lies in ``[x[m], X]`` when ``h = 1`` and
  is 0 when ``h = 0``); and the *greedy* cut ``read sum_i w_i [source i computed on m]``.
  ``1 - exp(-sum_{i in A} x_i)`` is submodular in the set ``A`` of sources a copy serves, and
  the greedy weights of any order (``w_i = exp(-sum_{j before i} x_j) (1 - exp(-x_i))``, here
  ``m`` itself first, then the others by choices) are a vertex of its base polytope (Edmonds),
  so ``sum_{i in A} w_i <= 1 - exp(-sum_A x)`` for every ``A``. ``max_m P[m, l] >= sum_e t[m,
  l, e]`` on a grouped kernel; on a server without one (dense over its ``G`` slots) each of the
  four sums over ``e`` is at most its time separately (its read ``G W_e (1 - exp(-R))`` and its
  multiply ``R G F_e`` are at least the sums of every expert's read and multiply).
* **Dispatch** ``max_n (sum_m a C[n, m] / bw[n, m] + max_m used[n, m] lat[n, m])`` with ``used =
  1 - exp(-C)``: bytes exact; ``used`` at least the chord ``C (1 - exp(-S)) / S`` (``S =
  sum_e x[n, l, e]``, the most a link carries), the greedy cut over ``n``'s experts (largest
  first) and ``(1 - exp(-x[n, l, e])) z[n, m, l, e]`` for ``n``'s ``top_experts`` largest
  choices (a link that carries a choice carries at least it). **Combine** the same, by
  receiver (``lat[m, n]`` on the way back).
* **Latency floors in ``h`` alone** (the LP may split a choice over several holders, a placement
  sends it to one): a source that does not host ``(l, e)`` sends all of it over one link, so its
  dispatch latency is at least ``lat_n (1 - exp(-x[n, e])) (1 - h[n, e])`` (``lat_n`` its
  cheapest outgoing link) and, ``used`` being subadditive over links, at least ``lat_n / (N -
  1) sum_e w[n, e] (1 - h[n, e])``; the receivers' combine latencies sum to at least the same
  with ``n``'s cheapest incoming link and without the ``1 / (N - 1)``.

Dropped (so the LP may be loose): integrality of ``h`` and ``z``, and the coupling of decode and
prefill through one placement. Solved by HiGHS' interior point method (``scipy.optimize.
linprog``) in units of the largest per-expert time (its tolerances are absolute); its value is
scaled down by ``_MARGIN`` for the solver's relative tolerance, and an unsolved LP (time limit)
gives no bound. Its size is ``N (N - 1) L E`` routing variables: about 2 minutes for OLMoE on
8 servers (57,344) on two cores. ``tests/placement/test_bounds.py`` checks it against exhaustive
optima of tiny instances (grouped and dense kernels, latency- and bytes-bound links), every
registered method on a table-like instance, and the coupled bound across racks.
"""
from __future__ import annotations

import hashlib

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from moe_edge.core.errors import PlacementError
from moe_edge.placement.common import greedy_assign

# Relative margin under the LP's reported optimum (HiGHS' optimality tolerance is 1e-7).
_MARGIN = 1e-6
_METHOD = "highs-ipm"
# solved LPs by the digest of their inputs (the tables' best_known and lower bound share one)
_SOLVED: dict[str, tuple[float, dict | None]] = {}
_SOLVED_MAX = 8


def lp_cells(shape: tuple[int, int, int]) -> int:
  """Routing variables ``N (N - 1) L E`` of the LP of a ``[N, L, E]`` problem (what the size
  limits ``lp_max_cells`` are compared with; the LP takes about 2 s per 10^3 on two cores)."""
  n, l, e = shape
  return n * (n - 1) * l * e


def rounded_hosts(h: np.ndarray, capacity: np.ndarray) -> np.ndarray:
  """``[N, L, E]`` bool hosts from the LP's fractional ``h [N, L, E]``: each expert, the most
  decided (largest ``max_m h``) first, on its largest-``h`` server with room; then every further
  ``h >= 1/2`` in descending order where the server has room. Feasible whenever ``capacity
  [N]`` holds every expert once."""
  n, l, e = h.shape
  flat = h.reshape(n, -1)                                                # [N, K]
  if np.sum(capacity) < flat.shape[1]:
    raise PlacementError(f"LP start: capacities {np.asarray(capacity).tolist()} cannot hold "
                         f"the {l * e} experts once; give the servers more expert memory.")
  room = np.asarray(capacity, dtype=np.int64).copy()
  owner = greedy_assign(-flat.T, np.argsort(-flat.max(axis=0), kind="stable"), room)
  hosts = np.zeros(flat.shape, dtype=bool)
  hosts[owner, np.arange(flat.shape[1])] = True
  room -= hosts.sum(axis=1)
  for idx in np.argsort(-flat.ravel(), kind="stable"):
    m, k = divmod(int(idx), flat.shape[1])
    if flat[m, k] < 0.5:
      break
    if not hosts[m, k] and room[m] > 0:
      hosts[m, k] = True
      room[m] -= 1
  return hosts.reshape(n, l, e)


def _digest(hw, x: np.ndarray, capacity, comp, top_experts: int) -> str:
  d = hashlib.sha256()
  for a in (x, np.asarray(capacity, np.float64), hw.expert_read, hw.expert_flop, hw.inv_bw,
            hw.lat, np.zeros(0) if comp is None else np.asarray(comp, np.float64),
            np.zeros(0) if hw.grouped is None else np.asarray(hw.grouped, np.float64)):
    d.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    d.update(b"|")
  d.update(f"{hw.act}|{top_experts}".encode())
  return d.hexdigest()


class _Rows:
  """Sparse ``A_ub`` / ``A_eq`` rows collected as coordinate triplets."""

  def __init__(self):
    self.r, self.c, self.v, self.n = [], [], [], 0

  def new(self, count: int) -> np.ndarray:
    ids = np.arange(self.n, self.n + count)
    self.n += count
    return ids

  def add(self, rows, cols, vals) -> None:
    rows, cols, vals = np.broadcast_arrays(np.asarray(rows), np.asarray(cols),
                                           np.asarray(vals, dtype=np.float64))
    self.r.append(rows.ravel())
    self.c.append(cols.ravel())
    self.v.append(vals.ravel())

  def matrix(self, cols: int) -> sparse.csr_matrix:
    if not self.r:
      return sparse.csr_matrix((self.n, cols))
    return sparse.coo_matrix((np.concatenate(self.v), (np.concatenate(self.r),
                                                        np.concatenate(self.c))),
                             shape=(self.n, cols)).tocsr()


def _time_unit(hw, xf: np.ndarray) -> float:
  """Seconds of the LP's time unit: the largest expert read, expert compute, link latency or
  link bytes time of one expert's choices (1 when all are 0)."""
  most = float(xf.max(initial=0.0))
  u = max(float(np.max(hw.expert_read)), float(np.max(hw.expert_flop)) * most,
          float(np.max(hw.lat)), float(np.max(hw.act * hw.inv_bw)) * most)
  return u if u > 0 and np.isfinite(u) else 1.0


def _greedy_weights(xs: np.ndarray) -> np.ndarray:
  """``w`` of the same shape as ``xs [..., S]``: the greedy vertex of the submodular ``g(A) = 1 -
  exp(-sum_{i in A} xs[i])`` in the order of the last axis (``w_i = exp(-sum_{j < i} xs[j]) (1
  - exp(-xs[i]))``). ``sum_{i in A} w_i <= g(A)`` for every set ``A`` (Edmonds: a vertex of the
  base polytope of a submodular function), so ``w`` under-estimates ``g`` linearly at every 0/1
  point."""
  before = np.cumsum(xs, axis=-1) - xs
  return np.exp(-before) * -np.expm1(-xs)


def _greedy_read_cut(xf, read, src, dst, zk):
  """The read cut ``t[m, k] >= read[m] sum_i w_i [source i's choices computed on m]`` with the
  greedy weights of the order: ``m`` itself first (its own choices stay local when it hosts),
  then the other sources by choices, largest first. Returns ``(z coefficient [Z], h
  coefficient [N, K])``."""
  n, k = xf.shape
  w = np.zeros((n, n, k))                          # [m, source, k]
  for m in range(n):
    key = np.where(np.arange(n)[:, None] == m, np.inf, xf)
    order = np.argsort(-key, axis=0, kind="stable")                    # [S, K]
    ws = _greedy_weights(np.take_along_axis(xf, order, axis=0).T).T
    np.put_along_axis(w[m], order, ws, axis=0)
  h_coef = read[:, None] * w[np.arange(n), np.arange(n)]
  return read[dst] * w[dst, src, zk], h_coef


def _latency_floor_rows(ub, b_ub, xf, wlink, h_id, ld_id, lc_id, lat, layer) -> None:
  """Link-latency rows in the hosting variables alone (routing shares may split over holders in
  the LP, a real choice goes to one): a source ``n`` that does not host ``(l, e)`` sends all its
  choices of it over one link, so its dispatch latency ``Ld[n, l] >= lat_n (1 - exp(-x[n, e]))
  (1 - h[n, e])`` (``lat_n``: its cheapest outgoing link) and, as ``used`` is subadditive over
  links, ``Ld[n, l] >= lat_n / (N - 1) sum_e w[n, e] (1 - h[n, e])`` (greedy weights); the
  receivers' combine latencies sum to at least the same with ``n``'s cheapest incoming link and
  without the ``1 / (N - 1)``."""
  n, k = xf.shape
  if n == 1:
    return
  off = np.where(np.eye(n, dtype=bool), np.inf, lat)
  out_min, in_min = off.min(axis=1), off.min(axis=0)                    # [N]
  sn, sk = np.nonzero(xf > 0)
  one = -np.expm1(-xf[sn, sk])
  others = (np.arange(n)[None, :] != sn[:, None])                        # [R, N]
  for floor, lat_cols in ((out_min, ld_id[sn, layer[sk]][:, None]),
                          (in_min, lc_id[:, layer[sk]].T)):
    r = ub.new(sn.size)
    ub.add(r, h_id[sn, sk], -floor[sn] * one)
    if lat_cols.shape[1] == 1:
      ub.add(r, lat_cols[:, 0], -1.0)
    else:
      rr, cc = np.nonzero(others)
      ub.add(r[rr], lat_cols[rr, cc], -1.0)
    b_ub.append(-floor[sn] * one)
  l = ld_id.shape[1]
  wsum = np.zeros((n, l))
  np.add.at(wsum, (sn, layer[sk]), wlink[sn, sk])
  for floor, div, is_disp in ((out_min, n - 1.0, True), (in_min, 1.0, False)):
    r = ub.new(n * l).reshape(n, l)
    coef = floor[sn] / div * wlink[sn, sk]
    ub.add(r[sn, layer[sk]], h_id[sn, sk], -coef)
    if is_disp:
      ub.add(r, ld_id, -1.0)
    else:
      m_, n_, l_ = np.nonzero(np.broadcast_to(~np.eye(n, dtype=bool)[:, :, None], (n, n, l)))
      ub.add(r[n_, l_], lc_id[m_, l_], -1.0)
    b_ub.append(-(floor[:, None] / div * wsum).ravel())


def lp_phase_bound(hw, x: np.ndarray, capacity: np.ndarray, comp: np.ndarray | None = None,
                   top_experts: int = 4, time_limit: float = 600.0, solution: bool = False):
  """The LP's lower bound of ``sum_l (dispatch_l + combine_l + max_m P[m, l])`` (module
  docstring) for ``x [N, L, E]`` expected token-choices per step and ``capacity [N]`` slots.

  Args:
    comp: ``[L]`` known lower bounds of each layer's ``max_m P`` (``bounds.compute_bound``),
      used as the LP's variable bounds; None for none.
    top_experts: per source and layer, how many of its largest choices get the per-choice
      link-latency rows.
    time_limit: seconds HiGHS may take (past it the LP gives no bound: ``-inf``).
    solution: also return the LP's hosting ``h [N, L, E]`` (a fractional placement; None when
      unsolved).
  Returns:
    the bound in seconds; ``-inf`` when HiGHS does not solve the LP (never an invalid value);
    ``(bound, solution)`` with ``solution``: ``{"h": [N, L, E], "compute" / "dispatch" /
    "combine": [L] seconds}`` (None when unsolved). The last few solved LPs are remembered by
    their inputs, so asking again costs nothing.
  """
  x = np.asarray(x, dtype=np.float64)
  key = _digest(hw, x, capacity, comp, top_experts)
  if key not in _SOLVED:
    if len(_SOLVED) >= _SOLVED_MAX:
      _SOLVED.pop(next(iter(_SOLVED)))
    _SOLVED[key] = _solve(hw, x, capacity, comp, top_experts, time_limit)
  value, sol = _SOLVED[key]
  return (value, sol) if solution else value


def _solve(hw, x: np.ndarray, capacity, comp, top_experts: int, time_limit: float):
  """``(bound, solution or None)`` of :func:`lp_phase_bound`."""
  n, l, e = x.shape
  k = l * e
  xf = x.reshape(n, k)                                                  # [N, K]
  tot = xf.sum(axis=0)                                                  # [K]
  layer = np.arange(k) // e
  # the LP in units of the largest per-expert time (HiGHS' tolerances are absolute)
  unit = _time_unit(hw, xf)
  # ---- variables: h, z, t, P, D, Kc, Ld, Lc ------------------------------------------------
  h_id = np.arange(n * k).reshape(n, k)
  src, dst, zk = [], [], []
  for a in range(n):
    live = np.flatnonzero(xf[a] > 0)
    for b in range(n):
      if b != a:
        src.append(np.full(live.size, a))
        dst.append(np.full(live.size, b))
        zk.append(live)
  src, dst, zk = (np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64)
                  for v in (src, dst, zk))
  zx = xf[src, zk]                                                      # choices behind each z
  z_id = n * k + np.arange(src.size)
  grouped = np.ones(n, bool) if hw.grouped is None else np.asarray(hw.grouped, bool)
  tm, tk = np.nonzero((tot[None, :] > 0) & grouped[:, None])
  t_id = np.full((n, k), -1)
  t_id[tm, tk] = n * k + src.size + np.arange(tm.size)
  nxt = n * k + src.size + tm.size
  p_id, d_id, c_id = (nxt + np.arange(l), nxt + l + np.arange(l), nxt + 2 * l + np.arange(l))
  ld_id = nxt + 3 * l + np.arange(n * l).reshape(n, l)
  lc_id = nxt + 3 * l + n * l + np.arange(n * l).reshape(n, l)
  cols = nxt + 3 * l + 2 * n * l
  cost = np.zeros(cols)
  cost[p_id] = cost[d_id] = cost[c_id] = 1.0
  lo, hi = np.zeros(cols), np.full(cols, np.inf)
  hi[:n * k + src.size] = 1.0
  if comp is not None:
    lo[p_id] = np.asarray(comp, dtype=np.float64) / unit
  ub, eq = _Rows(), _Rows()
  # ---- hosting, routing, memory ------------------------------------------------------------
  live_n, live_k = np.nonzero(xf > 0)
  rid = np.full((n, k), -1)
  rid[live_n, live_k] = eq.new(live_n.size)
  eq.add(rid[live_n, live_k], h_id[live_n, live_k], 1.0)
  eq.add(rid[src, zk], z_id, 1.0)
  r = ub.new(src.size)
  ub.add(r, z_id, 1.0)
  ub.add(r, h_id[dst, zk], -1.0)
  r = ub.new(k)
  ub.add(r[None, :], h_id, -1.0)
  r = ub.new(n)
  ub.add(r[:, None], h_id, 1.0)
  b_ub = [np.zeros(src.size), -np.ones(k), np.asarray(capacity, dtype=np.float64)]
  # ---- expert compute ----------------------------------------------------------------------
  read, flop = np.asarray(hw.expert_read, float) / unit, np.asarray(hw.expert_flop, float) / unit
  with np.errstate(divide="ignore", invalid="ignore"):
    chord0 = np.where(tot > 0, -np.expm1(-tot) / tot, 0.0)              # [K]
    own_t = -np.expm1(-xf)                                              # [N, K] / read
    span = tot[None, :] - xf
    alpha = np.where(span > 1e-12 * np.maximum(tot, 1.0)[None, :],
                     (-np.expm1(-tot)[None, :] - own_t) / np.where(span > 0, span, 1.0), 0.0)
  # cuts per (m, k), each ``z coefficient [Z], h coefficient [N, K]``: flop, the two chords
  cuts = [(flop[dst] * zx, flop[:, None] * xf),
          (read[dst] * chord0[zk] * zx, read[:, None] * chord0[None, :] * xf),
          (read[dst] * alpha[dst, zk] * zx, read[:, None] * own_t)]
  cuts.append(_greedy_read_cut(xf, read, src, dst, zk))
  live_m = tot > 0
  for z_coef, h_coef in cuts:
    row = np.full((n, k), -1)
    gm, gk = np.nonzero(live_m[None, :] & grouped[:, None])
    row[gm, gk] = ub.new(gm.size)
    ag = np.flatnonzero(~grouped)
    if ag.size:  # one row per (server, layer) summing the cut over the layer's experts
      agg = ub.new(ag.size * l).reshape(ag.size, l)
      for i, m in enumerate(ag):
        row[m, live_m] = agg[i, layer[live_m]]
      ub.add(agg, p_id[None, :], -1.0)
      b_ub.append(np.zeros(agg.size))
    sel = row[dst, zk] >= 0
    ub.add(row[dst, zk][sel], z_id[sel], z_coef[sel])
    hm, hk = np.nonzero(row >= 0)
    ub.add(row[hm, hk], h_id[hm, hk], h_coef[hm, hk])
    ub.add(row[gm, gk], t_id[gm, gk], -1.0)
    b_ub.append(np.zeros(gm.size))
  r = ub.new(n * l).reshape(n, l)
  ub.add(r[tm, layer[tk]], t_id[tm, tk], 1.0)
  ub.add(r, p_id[None, :], -1.0)
  b_ub.append(np.zeros(n * l))
  # ---- exchange ----------------------------------------------------------------------------
  zl = layer[zk]
  per_byte = hw.act * np.asarray(hw.inv_bw, float) / unit
  lat = np.asarray(hw.lat, float) / unit
  s_tot = x.sum(axis=2)                                                  # [N, L]
  with np.errstate(divide="ignore", invalid="ignore"):
    slope = np.where(s_tot > 0, -np.expm1(-s_tot) / s_tot, 0.0)          # used >= slope C
  order_all = np.argsort(-x, axis=2, kind="stable")                      # [N, L, E]
  top = np.zeros((n, k), bool)
  top[np.arange(n)[:, None, None],
      np.arange(l)[None, :, None] * e + order_all[:, :, :top_experts]] = True
  top &= xf > 0
  ztop = top[src, zk]
  # greedy weights of each source's choices in a layer, largest first (``_greedy_weights``)
  wlink = np.zeros_like(x)
  np.put_along_axis(wlink, order_all, _greedy_weights(np.take_along_axis(x, order_all, axis=2)),
                    axis=2)
  wlink = wlink.reshape(n, k)
  # dispatch by sender n (link lat[n, m]), combine by receiver m (results back, lat[m, n])
  for own, other, tot_id, lat_id in ((src, dst, d_id, ld_id), (dst, src, c_id, lc_id)):
    # bytes plus the latency term of each sender (dispatch) / receiver (combine)
    r = ub.new(n * l).reshape(n, l)
    ub.add(r[own, zl], z_id, per_byte[own, other] * zx)
    ub.add(r, lat_id, 1.0)
    ub.add(r, tot_id[None, :], -1.0)
    b_ub.append(np.zeros(n * l))
    # chord of used per link: lat[own, other] * slope[src, l] * C[src, dst, l] <= L[own, l]
    r = ub.new(n * n * l).reshape(n, n, l)
    ub.add(r[own, other, zl], z_id, lat[own, other] * slope[src, zl] * zx)
    ub.add(r, lat_id[:, None, :], -1.0)
    b_ub.append(np.zeros(n * n * l))
    # the greedy under-estimator of used per link: lat sum_e w[src, e] z <= L[own, l]
    r = ub.new(n * n * l).reshape(n, n, l)
    ub.add(r[own, other, zl], z_id, lat[own, other] * wlink[src, zk])
    ub.add(r, lat_id[:, None, :], -1.0)
    b_ub.append(np.zeros(n * n * l))
    # a link that carries one of the source's large choices pays at least its used weight
    sel = np.flatnonzero(ztop)
    r = ub.new(sel.size)
    ub.add(r, z_id[sel], (lat[own, other] * -np.expm1(-zx))[sel])
    ub.add(r, lat_id[own[sel], zl[sel]], -1.0)
    b_ub.append(np.zeros(sel.size))
  _latency_floor_rows(ub, b_ub, xf, wlink, h_id, ld_id, lc_id, lat, layer)
  res = linprog(cost, A_ub=ub.matrix(cols), b_ub=np.concatenate(b_ub), A_eq=eq.matrix(cols),
                b_eq=np.ones(eq.n), bounds=np.stack([lo, hi], axis=1), method=_METHOD,
                options=dict(time_limit=float(time_limit)))
  if res.status != 0:
    return -np.inf, None
  return float(res.fun) * unit * (1.0 - _MARGIN), dict(
      h=res.x[:n * k].reshape(n, l, e), compute=unit * res.x[p_id],
      dispatch=unit * res.x[d_id], combine=unit * res.x[c_id])
