"""Routing counts of served tokens in time bins: what a migration controller sees."""
from __future__ import annotations

import dataclasses

import numpy as np


def step_groups(prefill_tokens: np.ndarray) -> np.ndarray:
  """``[S]`` group of each step from its ``prefill_tokens [S, N]``: 0 for a step in which no
  server prefills, ``1 + n`` for one whose largest prompt chunk is server ``n``'s (ties: the
  lowest ``n``). ``N + 1`` groups: steps of one group cost alike (decode steps; prefill steps
  whose slowest exchange is the leading server's)."""
  pre = np.asarray(prefill_tokens)
  return np.where(pre.max(axis=1) > 0, 1 + pre.argmax(axis=1), 0)


@dataclasses.dataclass
class Window:
  """Routing counts of the served tokens in bins of ``bin_s`` simulated seconds.

  ``counts[b]``: ``[N, L, E]`` token-choices per server, layer and expert of the steps that
  started in bin ``b``; ``tokens[b]``: ``[N]`` tokens fed; ``steps[b]``: steps started;
  ``mix_steps[b]``: ``[N + 1]`` steps per group (:func:`step_groups`) and ``mix_tokens[b]``:
  ``[N + 1, N]`` their tokens per server (prompt chunks and decodes), when the steps' batches
  were given (:meth:`add_mix`).
  """
  bin_s: float
  shape: tuple[int, int, int]
  counts: dict = dataclasses.field(default_factory=dict)
  tokens: dict = dataclasses.field(default_factory=dict)
  steps: dict = dataclasses.field(default_factory=dict)
  mix_steps: dict = dataclasses.field(default_factory=dict)
  mix_tokens: dict = dataclasses.field(default_factory=dict)

  def add_steps(self, start_s: np.ndarray) -> None:
    for b, c in zip(*np.unique(np.floor(start_s / self.bin_s).astype(np.int64),
                               return_counts=True)):
      self.steps[int(b)] = self.steps.get(int(b), 0) + int(c)

  def add_mix(self, start_s: np.ndarray, prefill_tokens: np.ndarray,
              decode_tokens: np.ndarray) -> None:
    """Tally steps starting at ``start_s [S]`` with ``prefill_tokens``/``decode_tokens``
    ``[S, N]`` per server into their bins' step mix."""
    n = self.shape[0]
    group = step_groups(prefill_tokens)
    fed = np.asarray(prefill_tokens, np.float64) + np.asarray(decode_tokens, np.float64)
    b_step = np.floor(np.asarray(start_s) / self.bin_s).astype(np.int64)
    for b in np.unique(b_step):
      sel = b_step == b
      steps = np.bincount(group[sel], minlength=n + 1)
      toks = np.zeros((n + 1, n))
      np.add.at(toks, group[sel], fed[sel])
      self.mix_steps[int(b)] = self.mix_steps.get(int(b), 0) + steps
      self.mix_tokens[int(b)] = self.mix_tokens.get(int(b), 0) + toks

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

  def _inside(self, t0: float, t1: float, parity: int | None) -> list[int]:
    return [b for b in self.steps
            if t0 <= b * self.bin_s and (b + 1) * self.bin_s <= t1 + 1e-9 and (
                parity is None or b % 2 == parity)]

  def totals(self, t0: float, t1: float, parity: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(counts [N, L, E], tokens [N], steps)`` of the bins inside ``[t0, t1)`` (only bins
    of the given ``parity`` when set: two disjoint halves of a window)."""
    n, l, e = self.shape
    c, t, s = np.zeros((n, l, e)), np.zeros(n), 0
    for b in self._inside(t0, t1, parity):
      c += self.counts.get(b, 0)
      t += self.tokens.get(b, 0)
      s += self.steps[b]
    return c, t, s

  def mix(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [N + 1], tokens [N + 1, N])`` of the bins inside ``[t0, t1)``: steps per group
    (:func:`step_groups`) and their tokens per server, summed."""
    n = self.shape[0]
    s, t = np.zeros(n + 1), np.zeros((n + 1, n))
    for b in self._inside(t0, t1, None):
      s += self.mix_steps.get(b, 0)
      t += self.mix_tokens.get(b, 0)
    return s, t
