r"""A proven lower bound of the expected request latency over every feasible placement.

The latency search's objective (``search.py``) is an increasing function ``f(T_d, T_p)`` of the
expected decode and prefill step times (``cost/request_latency.py``), so lower bounds
``T_p >= B_p`` of each phase give ``f(B_d, B_p) <= f(T_d, T_p)`` for every placement. Per phase
(``x[n, l, e]`` expected token-choices per step, as in ``layer_state.py``), a step is
``dense + sum_l (dispatch_l + combine_l + max_m P[m, l])``; the dense part is exact and the rest
is bounded per layer by a relaxation that keeps only what no placement can avoid. Call ``S[n]``
the experts whose choices from ``n`` are served on ``n`` itself (``k[n] = |S[n]|`` slots) and
``R[n] = sum_{e not in S[n]} x[n, e]`` its remote choices:

* **Expert compute** (a floor independent of the placement): expert ``(l, e)``'s ``X = sum_n
  x[n, l, e]`` choices are computed somewhere; a part ``c <= X`` on ``m`` costs at least
  ``c r[m]``, ``r[m] = max(read[m] (1 - exp(-X)) / X, flop[m])``, so ``max_m P[m, l]`` is at
  least the LP ``min t : sum_e r[m, e] y[m, e] <= t, sum_m y[m, e] = X_e, y >= 0`` (HiGHS;
  above ``lp_max_size`` variables the weaker ``max_e X_e / sum_m 1 / r[m, e]``): ``comp[l]``.
* **Coupling of compute and exchange**: ``P[n] >= sum_{e in S[n]} t_n(x[n, e])`` (its own
  choices of the experts it serves locally, ``t_n = hw.expert_time`` on ``n``, increasing in
  the count; the dense-over-slots kernel costs at least as much). So if ``max_m P`` lies in
  ``[pi_j, pi_{j+1}]`` (segments from ``comp[l]`` up), ``n``'s local choices are at most the
  fractional knapsack ``min(top_k, G_n(pi_{j+1}))``: its ``k`` largest, and the most it can hold
  with own work ``<= pi_{j+1}`` (greedy in descending ``x``, which is also the order of
  ``x / t_n(x)``); the layer costs at least ``pi_j`` plus the exchange of those remote choices.
* **Dispatch**: ``dispatch >= max_n D[n]``, ``D[n] = a R[n] min_m inv_bw[n, m] + min_m lat[n,
  m] (1 - exp(-R[n] / (N - 1)))`` (its sends, and its busiest link carries ``>= R / (N - 1)``).
* **Combine**, two bounds mixed by ``lambda`` in ``LAMBDAS`` (``combine >= lambda A + (1 -
  lambda) max_n H[n]``): ``H[n]``, the host of ``n``'s busiest link returns ``>= R[n] / (N - 1)``
  choices and pays its latency; ``A``, the busiest host returns ``>= s / N`` of the ``s = sum_n
  R[n]`` remote choices: ``A = a s / N min inv_bw + psi(s)``, ``psi(s) = min lat (1 - exp(-s /
  (N (N - 1))))``. ``psi`` is concave, so ``min_c (alpha_c + beta_c s)`` over its secants of a
  grid (extended, each lies above ``psi`` outside its interval) is below it and linear in ``s``:
  the minimum over ``c`` commutes with the minimum over placements, and ``A`` splits over the
  servers.
* **Memory** couples the layers: ``sum_l k[n, l] <= C[n]``, ``0 <= k <= min(E, C[n])``. It is
  relaxed by Lagrange multipliers ``mu[n] >= 0``: for every ``mu``, ``sum_l min [layer bound +
  sum_n mu[n] k[n, l]] - sum_n mu[n] C[n]`` is a lower bound (weak duality). Each layer's inner
  minimum is exact over ``k`` for each segment of ``max_m P`` and of ``max_n (D[n] + (1 -
  lambda) H[n])`` (a grid: within segment ``[tau_i, tau_{i+1}]`` every server keeps
  ``D + (1 - lambda) H <= tau_{i+1}`` and the layer pays ``tau_i``), each server then taking its
  cheapest allowed ``k``; a layer takes its best ``lambda``. ``mu`` is chosen by Kelley's
  cutting planes (HiGHS) on the dual of ``lambda = 1``; the best value seen is kept, so any
  number of iterations leaves a valid bound.

Dropped (so the bound stays valid and may be loose): that every expert is hosted somewhere,
that remote choices go to a server that holds the expert and its weight reads there, replica
reads beyond each server's own choices, link latencies beyond the busiest link, and the
coupling of decode and prefill through one placement. ``tests/placement/test_bounds.py`` checks
it against exhaustive optima of tiny instances, every registered method and the previous
(uncoupled) bound.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linprog

from moe_edge.cost.request_latency import request_latency
from moe_edge.core.errors import PlacementError
from moe_edge.placement.lp_bound import lp_cells, lp_phase_bound

# mixes lambda of the two combine bounds (module docstring)
LAMBDAS = np.array([1.0, 0.5, 0.0])


@dataclasses.dataclass(frozen=True)
class PhaseBound:
  """A lower bound of one phase's expected step time (seconds) and its parts.

  Attributes:
    step: the bound of ``T``: ``dense + compute + exchange``.
    dense: the dense part (exact: no placement changes it).
    compute: ``sum_l comp[l]``, the compute floor (the LP, independent of the placement).
    exchange: what the coupled Lagrangian bound adds above that floor: exchange plus the
      compute that keeping choices local forces (``step - dense - compute``).
    compute_exact: every layer's compute bound came from the LP (not the weaker fallback).
    facility_lp: the facility-location LP (``lp_bound.py``) was solved and gave the value.
  """
  step: float
  dense: float
  compute: float
  exchange: float
  compute_exact: bool
  facility_lp: bool = False


def compute_bound(hw, x: np.ndarray, lp_max_size: int = 1 << 15) -> tuple[np.ndarray, bool]:
  """``([L] lower bounds of max_m P[m, l], all from the LP)`` for ``x [N, L, E]``."""
  n, l, e = x.shape
  tot = x.sum(axis=0)                                                   # [L, E]
  with np.errstate(divide="ignore", invalid="ignore"):
    read = np.where(tot > 0, -np.expm1(-tot) / tot, 1.0)                # [L, E]
  r = np.maximum(hw.expert_read[:, None, None] * read[None], hw.expert_flop[:, None, None])
  out = np.empty(l)
  exact = n * e + 1 <= lp_max_size
  for li in range(l):
    live = np.flatnonzero(tot[li] > 0)
    if live.size == 0:
      out[li] = 0.0
      continue
    rl = r[:, li, live]                                                 # [N, E']
    weak = float(np.max(tot[li, live] / (1.0 / rl).sum(axis=0)))
    if not exact:
      out[li] = weak
      continue
    k = live.size
    c = np.zeros(n * k + 1)
    c[-1] = 1.0
    a_ub = np.zeros((n, n * k + 1))
    for m in range(n):
      a_ub[m, m * k:(m + 1) * k] = rl[m]
    a_ub[:, -1] = -1.0
    a_eq = np.zeros((k, n * k + 1))
    for m in range(n):
      a_eq[np.arange(k), m * k + np.arange(k)] = 1.0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=tot[li, live],
                  bounds=[(0, None)] * (n * k + 1), method="highs")
    if res.status != 0:
      out[li], exact = weak, False
      continue
    # The LP's value minus HiGHS' tolerance, never below the weak bound's certificate.
    out[li] = max(weak, float(res.fun) * (1.0 - 1e-7))
  return out, exact


def _own_tables(hw, x: np.ndarray):
  """``(xs, t, top, work)`` ``[L, N, E]`` / ``[L, N, E+1]``: each server's own choices of its
  experts sorted descending, their own work ``t_n(x)`` (``hw.expert_time`` on ``n``) and the
  prefix sums of both (``top[k]``, ``work[k]``: the ``k`` largest)."""
  srt = -np.sort(-x, axis=2)                                            # [N, L, E]
  t = hw.expert_time(srt, server_axis=0, expected=True)
  z = np.zeros(srt.shape[:2] + (1,))
  top = np.concatenate([z, np.cumsum(srt, axis=2)], axis=2)
  work = np.concatenate([z, np.cumsum(t, axis=2)], axis=2)
  return tuple(a.transpose(1, 0, 2) for a in (srt, t, top, work))


def _greedy_local(xs, t, top, work, limit: np.ndarray) -> np.ndarray:
  """``[L, N, J]`` the most own choices a server can serve locally with own work at most
  ``limit [L, J]`` (``inf``: no limit): the fractional knapsack, greedy in ``xs`` order (the
  order of ``x / t_n(x)`` too, as ``(1 - exp(-x)) / x`` falls)."""
  l, n, e = xs.shape
  j = np.empty((l, n, limit.shape[1]), dtype=np.int64)
  for a in range(l):
    for s in range(n):
      j[a, s] = np.searchsorted(work[a, s], limit[a], side="right") - 1
  ji = np.minimum(j, e - 1)
  xs_j, t_j = np.take_along_axis(xs, ji, axis=2), np.take_along_axis(t, ji, axis=2)
  lim = np.where(np.isinf(limit), 0.0, limit)[:, None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.where(t_j > 0, np.clip((lim - np.take_along_axis(work, j, axis=2)) / t_j, 0, 1),
                    1.0)
  g = np.take_along_axis(top, j, axis=2) + np.where(j < e, frac * xs_j, 0.0)
  return np.where(np.isinf(limit)[:, None, :], top[:, :, -1:], g)


def _compute_grid(work: np.ndarray, kmax: np.ndarray, comp: np.ndarray, size: int):
  """``(add [L, J], limit [L, J])``: segments of the layer's compute maximum ``max_m P``: a
  placement whose maximum lies in segment ``j`` costs at least ``add[j]`` and every server's own
  local work is at most ``limit[j]`` (geometric points from the compute bound ``comp [L]`` up to
  the most own work any server can hold; the last segment is unlimited)."""
  l = work.shape[0]
  hi = np.take_along_axis(work, np.broadcast_to(kmax[None, :, None], (l, kmax.size, 1)),
                          axis=2)[..., 0].max(axis=1)                  # [L]
  add = np.empty((l, size))
  for a in range(l):
    lo = comp[a]
    if hi[a] <= lo or size == 1:
      add[a] = lo
      continue
    first = max(lo, hi[a] * 1e-3)
    add[a, 0] = lo
    add[a, 1:] = np.geomspace(first, hi[a], size - 1) if first < hi[a] else hi[a]
    add[a] = np.maximum.accumulate(np.maximum(add[a], lo))
  limit = np.concatenate([add[:, 1:], np.full((l, 1), np.inf)], axis=1)
  return add, limit


def _link_coefficients(hw, n: int):
  """``(send, wait, recv, back)`` ``[N]``: the cheapest per-choice bytes time and latency of
  each server's outgoing links (dispatch) and of the links towards it (the combine)."""
  if n == 1:
    z = np.zeros(1)
    return z, z, z, z
  off = ~np.eye(n, dtype=bool)
  inv = np.where(off, hw.inv_bw, np.inf)
  lat = np.where(off, hw.lat, np.inf)
  return hw.act * inv.min(axis=1), lat.min(axis=1), hw.act * inv.min(axis=0), lat.min(axis=0)


def _chords(psi, s_max: float, count: int) -> tuple[np.ndarray, np.ndarray]:
  """``(alpha [count], beta [count])``: secants of the concave increasing ``psi`` (``psi(0) =
  0``) over a geometric grid of ``[0, s_max]``. Extended to every ``s``, a secant of a concave
  function lies above it outside its interval and below inside, so ``min_c alpha[c] + beta[c]
  s <= psi(s)`` for every ``s`` in ``[0, s_max]``."""
  if s_max <= 0:
    return np.zeros(count), np.zeros(count)
  pts = np.unique(np.concatenate([[0.0], np.geomspace(s_max / 2 ** (count - 1), s_max, count)]))
  v = psi(pts)
  beta = np.diff(v) / np.diff(pts)
  alpha = v[:-1] - beta * pts[:-1]
  pad = count - beta.size
  return np.pad(alpha, (0, pad), mode="edge"), np.pad(beta, (0, pad), mode="edge")


def _layer_tables(hw, x: np.ndarray, kmax: np.ndarray, comp: np.ndarray, pis: int, taus: int,
                  chords: int):
  """Everything of the coupled layer bound that does not depend on the memory prices.

  Returns ``(base [L, J, V, I], kmin [L, J, V, I, N], cost [L, J, V, N, K], vq [V])``: for
  compute segment ``j`` (:func:`_compute_grid`), variant ``v`` (a mix ``LAMBDAS[vq[v]]`` and
  one secant of the combine's latency, :func:`_chords`) and threshold segment ``i`` of
  ``F_n = D_n + (1 - lambda) H_n``: the constant part of the layer bound, the least ``k`` each
  server needs (``K = E + 1``; ``k`` counts the experts a server serves its own choices of
  locally) and each server's additive cost of ``k`` (``lambda`` times its share of the
  combine).
  """
  n, l, e = x.shape
  xs, t, top, work = _own_tables(hw, x)
  pi, limit = _compute_grid(work, kmax, comp, pis)
  local = np.minimum(top[:, None], _greedy_local(xs, t, top, work, limit).transpose(0, 2, 1)[
      ..., None])                                                        # [L, J, N, K]
  kk = np.minimum(np.arange(e + 1)[None, :], kmax[:, None])             # [N, K]
  local = np.take_along_axis(local, np.broadcast_to(kk, local.shape), axis=3)
  remote = np.maximum(top[:, None, :, -1:] - local, 0.0)                # [L, J, N, K]
  send, wait, recv, back = _link_coefficients(hw, n)
  share = remote / max(n - 1, 1)
  used = -np.expm1(-share)
  d = remote * send[:, None] + wait[:, None] * used
  h = share * recv[:, None] + back[:, None] * used
  lam = np.repeat(LAMBDAS, np.where(LAMBDAS > 0, chords, 1))
  vq = np.repeat(np.arange(LAMBDAS.size), np.where(LAMBDAS > 0, chords, 1))
  pairs = max(n * (n - 1), 1)
  psi = lambda s: back.min() * -np.expm1(-s / pairs)                    # noqa: E731
  sec = [_chords(psi, float(top[a, :, -1].sum()), chords) for a in range(l)]
  idx = np.concatenate([np.arange(chords) if q > 0 else [0] for q in LAMBDAS]).astype(int)
  alpha = np.stack([s_[0][idx] for s_ in sec]) * lam                    # [L, V]
  beta = np.stack([s_[1][idx] for s_ in sec]) * lam
  cost = remote[:, :, None] * (lam[None, None, :, None, None] * recv.min() / n
                               + beta[:, None, :, None, None])           # [L, J, V, N, K]
  f = d[:, :, None] + (1.0 - LAMBDAS)[None, None, :, None, None] * h[:, :, None]  # [L,J,Q,N,K]
  floor = f.min(axis=4).max(axis=3)                                     # [L, J, Q]
  ceil = f.max(axis=(3, 4))
  frac = np.linspace(0.0, 1.0, taus + 1)
  tau = floor[..., None] + (ceil - floor)[..., None] * frac[None, None, None, :]
  # segment i: the maximum of F lies in [tau[i], tau[i + 1]]: each F_n <= tau[i + 1]
  kmin = np.stack([(f[a][:, :, None] > tau[a][:, :, 1:, None, None]).sum(axis=4)
                   for a in range(l)])                                   # [L, J, Q, I, N]
  base = pi[:, :, None, None] + tau[:, :, vq, :-1] + alpha[:, None, :, None]
  return base, kmin[:, :, vq], cost, vq


def coupled_bound(hw, x: np.ndarray, capacity: np.ndarray, comp: np.ndarray,
                  upper: float | None = None, steps: int = 40, pis: int = 24, taus: int = 48,
                  chords: int = 5) -> float:
  """The Lagrangian lower bound of ``sum_l (dispatch_l + combine_l + max_m P[m, l])`` (module
  docstring) for ``x [N, L, E]``, ``capacity [N]`` and the compute bounds ``comp [L]``.

  Args:
    upper: a known value of the sum (caps the multipliers' model; any value keeps validity).
    steps: cutting-plane iterations at most; pis / taus: segments of the compute maximum and of
      the dispatch threshold per layer; chords: secants of the combine's latency.
  """
  n, l, e = x.shape
  cap = np.asarray(capacity, dtype=np.float64)
  kmax = np.minimum(cap, e).astype(np.int64)
  base, kmin, cost, vq = _layer_tables(hw, x, kmax, comp, pis, taus, chords)
  kk = e + 1
  karr = np.arange(kk)
  forbid = np.where(karr[None, :] > kmax[:, None], np.inf, 0.0)          # [N, K]
  la = np.arange(l)
  # flat index of (l, j, v, n, kmin) into cost [L, J, V, N, K], laid out [L, J, V, I, N]
  rows = np.arange(cost.size // kk).reshape(cost.shape[:4])             # [L, J, V, N]
  gather = rows[:, :, :, None, :] * kk + kmin                            # [L, J, V, I, N]
  mask = np.where(vq[None, :] == np.arange(LAMBDAS.size)[:, None], 0.0, np.inf)  # [Q, V]

  def dual(mu):
    h = cost + (mu[:, None] * karr + forbid)[None, None, None]
    suf = np.minimum.accumulate(h[..., ::-1], axis=-1)[..., ::-1]        # min of h[..., k:]
    vals = base + suf.ravel()[gather].sum(axis=4)                        # [L, J, V, I]
    flat = vals.transpose(0, 2, 1, 3).reshape(l, vq.size, -1)
    per_v = flat.min(axis=2)                                             # [L, V]
    per_q = (per_v[:, None, :] + mask[None]).min(axis=2)                 # [L, Q]: min of secants
    # the supergradient of mix 0's own (concave) dual: the slots its minimisers use
    v = (per_v + mask[0]).argmin(axis=1)
    j, i = np.divmod(flat[la, v].argmin(axis=1), base.shape[3])
    km = kmin[la, j, v, i]                                               # [L, N]
    row = np.where(karr[None, None, :] >= km[..., None], h[la, j, v], np.inf)  # [L, N, K]
    return (float(per_q.max(axis=1).sum() - mu @ cap), float(per_q[:, 0].sum() - mu @ cap),
            row.argmin(axis=2).sum(axis=0) - cap)

  # a slot is worth at most what it saves in one layer when all of a server's traffic is remote
  top = float(base[np.isfinite(base)].max()) + float(cost.max()) * n
  return _maximise(dual, n, top, steps, upper)


def _maximise(dual, n: int, top: float, steps: int, upper: float | None) -> float:
  """The best ``value`` of ``dual(mu) -> (value, own, supergradient of own)`` over the prices
  ``mu in [0, top]^N`` that Kelley's cutting planes visit on the concave ``own``; ``upper``
  (a known primal value) caps the cutting-plane model. Every visited value is a valid bound."""
  mu = np.zeros(n)
  best = own_best = -np.inf
  cuts_a, cuts_b = [], []
  cap_t = (None, None if upper is None else float(upper))
  for _ in range(steps):
    value, own, grad = dual(mu)
    best, own_best = max(best, value), max(own_best, own)
    if np.all((grad <= 0) & (mu == 0) | (grad == 0)):
      break                                   # complementary slackness: mu is optimal
    # cut: t <= own + grad (nu - mu)  ->  t - grad nu <= own - grad mu
    cuts_a.append(np.concatenate([[1.0], -grad]))
    cuts_b.append(own - float(grad @ mu))
    res = linprog(np.concatenate([[-1.0], np.zeros(n)]), A_ub=np.array(cuts_a),
                  b_ub=np.array(cuts_b), bounds=[cap_t] + [(0.0, top)] * n, method="highs")
    if res.status != 0 or res.x is None:
      break
    if -res.fun - own_best <= 1e-6 * abs(own_best) + 1e-15:
      break                                   # the cutting-plane model proves no gain
    mu = res.x[1:]
  return float(best)


def phase_choices(freq: np.ndarray, batch: np.ndarray) -> np.ndarray:
  """``x [N, L, E]``: expected token-choices per step of one phase with ``batch [N]`` tokens per
  server (what :func:`phase_bound` and best_known's LP start solve the LP on, so they share it)."""
  return np.asarray(batch, dtype=np.float64)[:, None, None] * freq


def phase_bound(hw, freq: np.ndarray, batch: np.ndarray, capacity: np.ndarray,
                upper: float | None = None, lp_max_cells: int = 0) -> PhaseBound:
  """:class:`PhaseBound` of one phase with ``batch [N]`` tokens per server and step;
  ``upper``: a known step time (caps the multipliers' model; any value keeps the bound valid);
  ``lp_max_cells``: also solve the facility-location LP (``lp_bound.py``) when the problem has
  at most this many routing variables (:func:`lp_cells`) and keep the larger bound."""
  x = phase_choices(freq, batch)
  dense = float(hw.dense_time(np.asarray(batch, dtype=np.float64)))
  comp, exact = compute_bound(hw, x)
  up = None if upper is None else upper - dense
  both = max(coupled_bound(hw, x, capacity, comp, up), float(comp.sum()))
  lp = lp_phase_bound(hw, x, capacity, comp) if lp_cells(x.shape) <= lp_max_cells else -np.inf
  return PhaseBound(dense + max(both, lp), dense, float(comp.sum()),
                    max(both, lp) - float(comp.sum()), exact, bool(lp > both))


def latency_lower_bound(problem, hw, workload, upper: tuple[float, float] | None = None,
                        lp_max_cells: int = 0):
  """``(bound on the mean request latency, decode PhaseBound, prefill PhaseBound)``.

  Args:
    hw: the ``Hardware`` the objective is priced on.
    workload: the ``WorkloadSummary`` of the objective.
    upper: best known ``(T_d, T_p)`` (caps the multipliers' cutting-plane model; any value keeps
      the bound valid).
    lp_max_cells: solve the facility-location LP too on problems of at most this many routing
      variables (:func:`lp_cells`; 0: never), keeping the larger bound per phase.
  """
  if problem.capacity.sum() < problem.shape[1] * problem.shape[2]:
    raise PlacementError("lower bound: the cluster cannot hold every expert once.")
  if lp_max_cells < 0:
    raise PlacementError(f"lower bound: lp_max_cells must be >= 0 (0 turns the LP off), got "
                         f"{lp_max_cells!r}.")
  dec = phase_bound(hw, problem.freq, workload.decode_batch, problem.capacity,
                    None if upper is None else upper[0], lp_max_cells)
  pre = phase_bound(hw, problem.freq, workload.prefill_tokens, problem.capacity,
                    None if upper is None else upper[1], lp_max_cells)
  return request_latency(dec.step, pre.step, workload).mean, dec, pre
