"""Sampling ``k`` distinct experts per token with prescribed inclusion frequencies.

Real routing statistics count *inclusions*: how often expert ``e`` is among a token's ``k``
choices, ``pi_e = counts_e / tokens`` (``sum_e pi_e = k``, each ``pi_e <= 1``). Drawing ``k``
distinct experts with the Gumbel-top-k trick (``argtop_k(log w + Gumbel noise)``, i.e.
Plackett-Luce sampling without replacement) from weights ``w = pi / k`` does *not* reproduce
``pi``: hot experts saturate (an expert chosen by 78 % of the tokens comes out at 61 % on
OLMoE's layer 7). So the weights are calibrated first: :func:`calibrate_inclusion` finds ``w``
whose Plackett-Luce inclusion probabilities equal ``pi``, computed exactly by
:func:`plackett_luce_inclusion`, and :func:`gumbel_top_k` then samples with them.

Exact inclusion probabilities (exponential-race form of Plackett-Luce: expert ``j`` arrives at
``T_j ~ Exp(w_j)``, the first ``k`` arrivals are the choice):

  ``pi_e = int_0^inf w_e exp(-w_e t) P(N_{-e}(t) <= k - 1) dt``

where ``N_{-e}(t)`` counts the other experts arrived by ``t``, a Poisson-binomial with
probabilities ``1 - exp(-w_j t)`` (prefix/suffix dynamic programme truncated at ``k``). The
integral is a trapezoid rule in ``log t``, whose integrand is smooth and decays exponentially at
both ends, so it converges geometrically in the step (step 0.25 gives about 1e-10).
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.errors import MoeEdgeError

_LOG_T_STEP = 0.25


class SamplingError(MoeEdgeError):
  """Target inclusion probabilities that no k-distinct sampler can realise."""


def plackett_luce_inclusion(log_w: np.ndarray, k: int) -> np.ndarray:
  """``[B, E]`` probability that expert ``e`` is among ``k`` Plackett-Luce draws without
  replacement from weights ``exp(log_w) [B, E]`` (``-inf`` = never drawn). Rows sum to ``k``."""
  log_w = np.asarray(log_w, dtype=np.float64)
  b, e = log_w.shape
  active = np.isfinite(log_w)
  if np.any(active.sum(-1) < k):
    raise SamplingError(f"every row needs at least k={k} experts with positive weight.")
  w = np.where(active, np.exp(log_w - np.where(active, log_w, -np.inf).max(-1, keepdims=True)),
               0.0)  # [B, E], max 1
  w_min = np.where(active, w, np.inf).min(-1)  # [B]
  lo, hi = np.log(1e-12), np.log(60.0 / w_min)  # t where the integrand is negligible
  n = int(np.ceil((hi - lo).max() / _LOG_T_STEP)) + 1
  t = np.exp(lo + _LOG_T_STEP * np.arange(n))  # [G] shared grid
  q = -np.expm1(-w[:, :, None] * t[None, None, :])  # [B, E, G]  P(T_j < t)
  pre = np.zeros((e + 1, b, n, k))  # pre[j]: count among experts < j, states 0..k-1
  pre[0, ..., 0] = 1.0
  suf = np.zeros((e + 1, b, n, k))  # suf[j]: count among experts >= j
  suf[e, ..., 0] = 1.0
  for j in range(e):
    qj = q[:, j, :, None]
    pre[j + 1] = pre[j] * (1.0 - qj)
    pre[j + 1][..., 1:] += pre[j][..., :-1] * qj
    qj = q[:, e - 1 - j, :, None]
    suf[e - 1 - j] = suf[e - j] * (1.0 - qj)
    suf[e - 1 - j][..., 1:] += suf[e - j][..., :-1] * qj
  # P(N_{-e} <= k-1) = sum_a pre[e][a] * P(suffix count <= k-1-a)
  suf_cdf_rev = np.cumsum(suf[1:], axis=-1)[..., ::-1]  # [E, B, G, k]: P(count <= k-1-a)
  below = np.einsum("ebga,ebga->beg", pre[:-1], suf_cdf_rev)  # [B, E, G]
  wt = w[:, :, None] * t[None, None, :]
  return np.sum(wt * np.exp(-wt) * below, axis=-1) * _LOG_T_STEP


def calibrate_inclusion(target: np.ndarray, k: int, tol: float = 1e-7, max_iter: int = 300
                        ) -> np.ndarray:
  """``log_w [B, E]`` whose Plackett-Luce top-``k`` inclusion probabilities equal ``target``.

  Args:
    target: ``[B, E]`` inclusion probabilities, each in [0, 1), rows summing to ``k``.
      Zero entries get ``log_w = -inf`` (never drawn).
    k: draws per token.
    tol: largest allowed ``|inclusion - target|``.

  Iteration: ``log w += step * (log target - log pi(w)) / max(1 - pi(w), 0.02)`` per row (the
  division speeds up experts near saturation), with the step halved for a row whenever it makes
  the row's error grow. Raises SamplingError if ``tol`` is not reached.
  """
  target = np.asarray(target, dtype=np.float64)
  if target.ndim != 2:
    raise SamplingError(f"target must be [B, E], got shape {target.shape}.")
  if np.any(target < 0) or np.any(target >= 1.0) or not np.all(np.isfinite(target)):
    raise SamplingError("target inclusion probabilities must lie in [0, 1): an expert chosen "
                        "by every token cannot be sampled from finite weights.")
  sums = target.sum(-1)
  if not np.allclose(sums, k, rtol=0, atol=1e-6 * k):
    raise SamplingError(f"target rows must sum to k={k} (k distinct choices per token), got "
                        f"sums in [{sums.min()}, {sums.max()}].")
  active = target > 0
  log_t = np.where(active, np.log(np.where(active, target, 1.0)), -np.inf)
  log_w = log_t.copy()
  incl = plackett_luce_inclusion(log_w, k)
  err = np.abs(incl - target).max(-1)
  step = np.full(target.shape[0], 0.5)
  for _ in range(max_iter):
    todo = err > tol
    if not todo.any():
      return log_w
    upd = np.where(active, (log_t - np.log(np.maximum(incl, 1e-300)))
                   / np.maximum(1.0 - incl, 0.02), 0.0)
    cand = log_w[todo] + step[todo, None] * upd[todo]
    cand -= np.where(active[todo], cand, -np.inf).max(-1, keepdims=True)
    c_incl = plackett_luce_inclusion(cand, k)
    c_err = np.abs(c_incl - target[todo]).max(-1)
    better = c_err < err[todo]
    rows = np.flatnonzero(todo)
    log_w[rows[better]], incl[rows[better]], err[rows[better]] = (
        cand[better], c_incl[better], c_err[better])
    step[rows[~better]] *= 0.5
  raise SamplingError(f"calibration did not reach tol={tol} in {max_iter} iterations (largest "
                      f"error {err.max():.2e}); the target may be too close to saturation.")


def gumbel_top_k(log_w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """``[..., k]`` int32 distinct experts per row of ``log_w [..., E]`` (Gumbel-top-k; ranks in
  draw order, i.e. by decreasing perturbed key).

  Args:
    log_w: ``[..., E]`` log weights (``-inf`` = never drawn; at least ``k`` finite per row).
    k: experts per row.
    rng: the random generator.

  The Gumbel noise is ``-log(Exp(1))`` in float32; the top ``k`` keys are taken by ``k`` rounds
  of argmax (each winner is then masked), which for the small ``k`` of MoE routers is faster
  than argpartition plus a sort.
  """
  expo = rng.standard_exponential(size=log_w.shape, dtype=np.float32)
  keys = log_w.astype(np.float32) - np.log(np.maximum(expo, np.finfo(np.float32).tiny))
  out = np.empty(log_w.shape[:-1] + (k,), dtype=np.int32)
  for r in range(k):
    best = np.argmax(keys, axis=-1)[..., None]
    if np.any(np.take_along_axis(keys, best, axis=-1) == -np.inf):
      raise SamplingError(f"a row of log_w has fewer than k={k} experts with positive weight.")
    out[..., r] = best[..., 0]
    np.put_along_axis(keys, best, -np.inf, axis=-1)
  return out
