"""Routing counts of served tokens in time bins: what a migration controller sees."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Window:
  """Routing counts of the served tokens in bins of ``bin_s`` simulated seconds.

  ``counts[b]``: ``[N, L, E]`` token-choices per server, layer and expert of the steps that
  started in bin ``b``; ``tokens[b]``: ``[N]`` tokens fed; ``steps[b]``: steps started.
  """
  bin_s: float
  shape: tuple[int, int, int]
  counts: dict = dataclasses.field(default_factory=dict)
  tokens: dict = dataclasses.field(default_factory=dict)
  steps: dict = dataclasses.field(default_factory=dict)

  def add_steps(self, start_s: np.ndarray) -> None:
    for b, c in zip(*np.unique(np.floor(start_s / self.bin_s).astype(np.int64),
                               return_counts=True)):
      self.steps[int(b)] = self.steps.get(int(b), 0) + int(c)

  def add(self, start_s: np.ndarray, step_of_token: np.ndarray, server: np.ndarray,
          ids: np.ndarray) -> None:
    n, l, e = self.shape
    b_tok = np.floor(start_s[step_of_token] / self.bin_s).astype(np.int64)
    for b in np.unique(b_tok):
      sel = b_tok == b
      srv = server[sel]
      key = ((srv[:, None, None] * l + np.arange(l)[None, :, None]) * e + ids[sel]).ravel()
      c = np.bincount(key, minlength=n * l * e).reshape(n, l, e)
      t = np.bincount(srv, minlength=n)
      self.counts[int(b)] = self.counts.get(int(b), 0) + c
      self.tokens[int(b)] = self.tokens.get(int(b), 0) + t

  def totals(self, t0: float, t1: float, parity: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(counts [N, L, E], tokens [N], steps)`` of the bins inside ``[t0, t1)`` (only bins
    of the given ``parity`` when set: two disjoint halves of a window)."""
    n, l, e = self.shape
    c, t, s = np.zeros((n, l, e)), np.zeros(n), 0
    for b in self.steps:
      if t0 <= b * self.bin_s and (b + 1) * self.bin_s <= t1 + 1e-9 and (
          parity is None or b % 2 == parity):
        c += self.counts.get(b, 0)
        t += self.tokens.get(b, 0)
        s += self.steps[b]
    return c, t, s
