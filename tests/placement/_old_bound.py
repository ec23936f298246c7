"""The previous lower bound of ``placement/bounds.py`` (before the compute/exchange coupling),
kept as the reference the coupled bound must beat (``test_bounds.py``). Its exchange part: each
server keeps its ``k`` largest experts local at no compute cost, dispatch from the busiest
sender, the combine's mean bytes, a Lagrangian memory price by subgradient steps."""
import numpy as np

from moe_edge.cost.request_latency import request_latency
from moe_edge.placement.bounds import compute_bound


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



def old_phase_step(hw, freq, batch, capacity) -> float:
  """The previous bound of one phase's expected step (seconds)."""
  x = np.asarray(batch, dtype=np.float64)[:, None, None] * freq
  comp, _ = compute_bound(hw, x)
  dense = float(hw.dense_time(np.asarray(batch, dtype=np.float64)))
  return dense + float(comp.sum()) + max(exchange_bound(hw, x, capacity), 0.0)


def old_latency_bound(problem, hw, wl) -> float:
  """The previous bound of the mean request latency."""
  dec = old_phase_step(hw, problem.freq, wl.decode_batch, problem.capacity)
  pre = old_phase_step(hw, problem.freq, wl.prefill_tokens, problem.capacity)
  return request_latency(dec, pre, wl).mean
