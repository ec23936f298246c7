"""A faster stable descending argsort for the placement hot paths."""
from __future__ import annotations

import numpy as np


def stable_argsort_desc(x: np.ndarray) -> np.ndarray:
  """``np.argsort(-x, axis=-1, kind="stable")`` (largest first, ties in index order), faster.

  An unstable sort is followed by putting every run of equal values back into index order:
  one integer sort of the unique keys ``(run, index)``, only for rows that have equal values.
  ``x`` must not contain NaN (infinities are fine).
  """
  x = np.asarray(x)
  if np.isnan(x).any():
    raise ValueError("stable_argsort_desc: x contains NaN.")
  rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
  order = np.argsort(-rows, axis=1)
  vals = np.take_along_axis(rows, order, axis=1)
  new_run = vals[:, 1:] != vals[:, :-1]
  tied = np.flatnonzero(~new_run.all(axis=1))
  if tied.size:
    run = np.zeros((tied.size, rows.shape[1]), dtype=np.int64)
    np.cumsum(new_run[tied], axis=1, out=run[:, 1:])
    key = run * rows.shape[1] + order[tied]
    order[tied] = np.take_along_axis(order[tied], np.argsort(key, axis=1), axis=1)
  return order.reshape(x.shape)
