r"""A proven lower bound of the expected request latency over every feasible placement.

The latency search's objective (``search.py``) is an increasing function ``f(T_d, T_p)`` of the
expected decode and prefill step times (``cost/request_latency.py``), so lower bounds
``T_p >= B_p`` of each phase give ``f(B_d, B_p) <= f(T_d, T_p)`` for every placement. Per phase
(``x[n, l, e]`` expected token-choices per step, as in ``layer_state.py``), a step is
``dense + sum_l (dispatch_l + combine_l + max_m P[m, l])``; each term is bounded from below by a
relaxation that keeps only what no placement can avoid:

* **Expert compute** (independent of the placement): expert ``(l, e)``'s ``X = sum_n x[n, l, e]``
  choices are computed somewhere, split ``y[m]`` over servers; a part ``c <= X`` on ``m`` costs at
  least ``c r[m]``, ``r[m] = max(read[m] (1 - exp(-X)) / X, flop[m])`` (``1 - exp(-c)`` is
  concave, so ``(1 - exp(-c)) / c`` falls with ``c``). ``max_m P[m, l]`` is at least the optimum
  of the LP ``min t : sum_e r[m, e] y[m, e] <= t, sum_m y[m, e] = X_e, y >= 0`` (HiGHS, via
  ``scipy.optimize.linprog``; above ``lp_max_size`` variables the weaker
  ``max_e X_e / sum_m 1 / r[m, e]`` is used instead).
* **Exchange**, given that server ``n`` holds ``k[n, l]`` experts of layer ``l``: at least
  ``R[n](k) = sum_e x[n, l, e] - (its k largest)`` of its choices are remote. Server ``n``'s
  sends take at least ``a R[n] min_m inv_bw[n, m]`` plus, as its busiest link carries at least
  ``R[n] / (N - 1)``, ``min_m lat[n, m] (1 - exp(-R[n] / (N - 1)))``: ``dispatch_l >= max_n D[n]``.
  The combine's busiest receiver takes at least the mean of all: ``combine_l >= (a / N) sum_n
  R[n] min_m inv_bw[m, n]``.
* **Memory** couples the layers: ``sum_l k[n, l] <= C[n]``, ``0 <= k <= min(E, C[n])``. It is
  relaxed by Lagrange multipliers ``mu[n] >= 0``: for every ``mu``
  ``sum_l min_k [max_n D + combine + sum_n mu[n] k[n, l]] - sum_n mu[n] C[n]`` is a lower bound
  (weak duality). Each layer's inner minimum is exact: over every threshold ``tau`` of
  ``max_n D``, each server takes its cheapest ``k`` with ``D[n](k) <= tau``. ``mu`` is improved by
  projected subgradient steps (Polyak steps towards ``upper``, the best known phase time); the
  best bound seen is kept, so any number of steps leaves a valid bound.

Dropped (so the bound stays valid and may be loose): the constraint that every expert is hosted
somewhere, that remote choices go to a server that holds the expert, replica reads on several
servers, link latencies beyond the busiest link of each sender, and the coupling of decode and
prefill through one placement.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linprog

from moe_edge.cost.request_latency import request_latency
from moe_edge.core.errors import PlacementError


@dataclasses.dataclass(frozen=True)
class PhaseBound:
  """A lower bound of one phase's expected step time (seconds) and its parts.

  Attributes:
    step: the bound of ``T``: ``dense + compute + exchange``.
    dense: the dense part (exact: no placement changes it).
    compute: ``sum_l`` of the compute bounds.
    exchange: the Lagrangian bound of ``sum_l (dispatch + combine)``.
    compute_exact: every layer's compute bound came from the LP (not the weaker fallback).
  """
  step: float
  dense: float
  compute: float
  exchange: float
  compute_exact: bool


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


def _exchange_terms(hw, x: np.ndarray, kmax: np.ndarray):
  """``(D [L, N, E+1], comb [L, N, E+1])``: dispatch and combine bounds as functions of k
  (``D`` held constant beyond ``kmax[n]``, where :func:`exchange_bound` forbids k)."""
  n, l, e = x.shape
  srt = -np.sort(-x, axis=2)                                            # [N, L, E] descending
  top = np.concatenate([np.zeros((n, l, 1)), np.cumsum(srt, axis=2)], axis=2)
  remote = np.maximum(top[:, :, -1:] - top, 0.0).transpose(1, 0, 2)     # [L, N, E+1]
  kk = np.minimum(np.arange(e + 1)[None, :], kmax[:, None])             # [N, E+1]
  remote_d = np.take_along_axis(remote, np.broadcast_to(kk, remote.shape), axis=2)
  if n > 1:
    off = ~np.eye(n, dtype=bool)
    send = hw.act * np.where(off, hw.inv_bw, np.inf).min(axis=1)
    recv = hw.act * np.where(off, hw.inv_bw, np.inf).min(axis=0)
    wait = np.where(off, hw.lat, np.inf).min(axis=1)
  else:
    send = recv = wait = np.zeros(n)
  d = remote_d * send[None, :, None] + wait[None, :, None] * -np.expm1(
      -remote_d / max(n - 1, 1))
  return d, remote * recv[None, :, None] / n


def _layer_min(d: np.ndarray, h: np.ndarray) -> tuple[float, np.ndarray]:
  """``min_k max_n d[n, k] + sum_n h[n, k]`` over ``k [N]`` and the minimising k.

  ``d [N, K]`` falls in k; ``h [N, K]`` is ``inf`` where k is not allowed (allowed k form a
  prefix containing the k where ``d`` reaches its minimum).
  """
  n, kk = d.shape
  rev = h[:, ::-1]
  best = np.minimum.accumulate(rev, axis=1)
  mark = rev <= best
  pos = np.maximum.accumulate(np.where(mark, np.arange(kk)[None, :], -1), axis=1)
  suf, suf_arg = best[:, ::-1], (kk - 1 - pos)[:, ::-1]                  # min of h[n, k:]
  floor = float(d.min(axis=1).max())
  taus = np.unique(d)
  taus = taus[taus >= floor]
  kmin = np.stack([np.searchsorted(-d[s], -taus, side="left") for s in range(n)])  # [N, T]
  vals = taus + np.take_along_axis(suf, kmin, axis=1).sum(axis=0)
  j = int(np.argmin(vals))
  return float(vals[j]), suf_arg[np.arange(n), kmin[:, j]]


def exchange_bound(hw, x: np.ndarray, capacity: np.ndarray, upper: float | None = None,
                   steps: int = 200) -> float:
  """The Lagrangian lower bound of ``sum_l (dispatch_l + combine_l)`` (module docstring)."""
  n, l, e = x.shape
  cap = np.asarray(capacity, dtype=np.float64)
  kmax = np.minimum(cap, e).astype(np.int64)
  d, comb = _exchange_terms(hw, x, kmax)
  mu = np.zeros(n)
  best = -np.inf
  karr = np.arange(e + 1)[None, :]
  comb = np.where(karr[None] > kmax[None, :, None], np.inf, comb)
  # a slot's typical worth: the largest dispatch saving of one more local expert
  scale = float(np.max(d[:, :, 0] - d[:, :, 1])) if e > 0 else 0.0
  decay = 0.5 ** (1.0 / max(steps / 8, 1))
  theta = 1.0
  for _ in range(steps):
    total, used = 0.0, np.zeros(n)
    for li in range(l):
      v, k = _layer_min(d[li], comb[li] + mu[:, None] * karr)
      total += v
      used += k
    value = total - float(mu @ cap)
    best = max(best, value)
    grad = used - cap
    norm = float(grad @ grad)
    if norm == 0 or np.all((grad <= 0) & (mu == 0) | (grad == 0)):
      break
    if upper is not None and upper > value:
      mu = np.maximum(0.0, mu + theta * (upper - value) / norm * grad)   # Polyak step
    else:
      mu = np.maximum(0.0, mu + theta * scale * grad / np.sqrt(norm))
    theta *= decay
  return float(best)


def phase_bound(hw, freq: np.ndarray, batch: np.ndarray, capacity: np.ndarray,
                upper: float | None = None) -> PhaseBound:
  """:class:`PhaseBound` of one phase with ``batch [N]`` tokens per server and step."""
  x = np.asarray(batch, dtype=np.float64)[:, None, None] * freq
  dense = float(hw.dense_time(np.asarray(batch, dtype=np.float64)))
  comp, exact = compute_bound(hw, x)
  up = None if upper is None else upper - dense - float(comp.sum())
  exch = exchange_bound(hw, x, capacity, up)
  exch = max(exch, 0.0)
  return PhaseBound(dense + float(comp.sum()) + exch, dense, float(comp.sum()), exch, exact)


def latency_lower_bound(problem, hw, workload, upper: tuple[float, float] | None = None):
  """``(bound on the mean request latency, decode PhaseBound, prefill PhaseBound)``.

  Args:
    hw: the ``Hardware`` the objective is priced on.
    workload: the ``WorkloadSummary`` of the objective.
    upper: best known ``(T_d, T_p)`` (steers the multipliers; any value keeps the bound valid).
  """
  if problem.capacity.sum() < problem.shape[1] * problem.shape[2]:
    raise PlacementError("lower bound: the cluster cannot hold every expert once.")
  dec = phase_bound(hw, problem.freq, workload.decode_batch, problem.capacity,
                    None if upper is None else upper[0])
  pre = phase_bound(hw, problem.freq, workload.prefill_tokens, problem.capacity,
                    None if upper is None else upper[1])
  return request_latency(dec.step, pre.step, workload).mean, dec, pre
