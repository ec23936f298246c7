"""Step 1 of DanceMoE: split each server's expert memory over layers by activation entropy
(``dancemoe.py``, module docstring)."""
from __future__ import annotations

import numpy as np


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
