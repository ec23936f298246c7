r"""Simulated annealing over hosts *and* routes: the polish stage of ``best_known``.

A different family from the latency search's rounds (``search.py``: screened, verified, greedy
batches of host changes, routes always to the nearest copy): one random change at a time, priced
by recomputing its layer exactly, accepted by the Metropolis rule at a temperature that falls
geometrically from ``t_start`` to ``t_end`` (fractions of the current score), so the state can
leave the local optima of greedy moves; the best state met is returned.

A change picks a layer ``l`` and an expert ``e`` (uniformly) and one of five kinds:

* *drop* one of ``e``'s copies (it has another): its sources go to their nearest remaining copy;
* *add* a copy on a server with room: it serves itself, and (with probability 0.7) every source
  that prefers it to its current copy;
* *move* a copy to a server with room (an add then a drop);
* *route*: a source without ``e`` sends it to another of ``e``'s copies -- routes need not be
  nearest (the cost model prices any route to a host; load and link latency terms may prefer
  another copy);
* *swap* on a server: drop its copy of ``e`` (``e`` has another) and add an expert it lacks;
* *exchange*: server ``n``'s copy of ``e`` moves to ``m``, ``m``'s copy of an expert ``n``
  lacks moves to ``n`` (swaps and exchanges are memory neutral, so full servers still change).

"Nearest" is ``hw.route_cost()`` order, as in ``layer_state.py``. The layer's time is the
cost model's expected layer time, from the layer's cached ``on``, ``flows`` and per-server sums
updated by the changed columns (``LayerState``'s caches; all recomputed at the end), the score the objective of ``search.py`` on the step times. Memory (each
server's ``capacity``), hosting (every expert at least once) and local routing (a held expert
is served locally) hold after every change. Deterministic for the generator given.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.placement.layer_state import LayerState


@dataclasses.dataclass(frozen=True)
class AnnealOptions:
  """Options of :func:`anneal`.

  Attributes:
    sweeps: changes tried per expert column (``sweeps * L * E`` in all).
    t_start, t_end: temperature at the first and last change, as fractions of the score.
  """
  sweeps: float = 100.0
  t_start: float = 3e-6
  t_end: float = 1e-8

  def __post_init__(self):
    if not self.sweeps >= 0:
      raise PlacementError(f"anneal: sweeps={self.sweeps!r} must be >= 0.")
    if not 0 < self.t_end <= self.t_start:
      raise PlacementError(f"anneal: need 0 < t_end <= t_start, got {self.t_end}, "
                           f"{self.t_start}.")


def _price(st: LayerState, layer: int, columns: list[int], hosts: np.ndarray,
           route: np.ndarray) -> tuple[np.ndarray, tuple]:
  """``([P] time, caches)`` of ``layer`` after its ``columns`` change to ``hosts``/``route
  [N, E]``: the cached ``on``, ``flows``, ``per`` and ``rows`` of the layer updated by the
  columns' change (as :meth:`LayerState.apply`, for any route), then the exact layer time."""
  n = st.shape[0]
  src = np.arange(n)
  flows, per, rows = st.flows[:, layer].copy(), st.per[:, layer].copy(), st.rows[:, layer].copy()
  on = []
  for e in columns:
    x = st.x[:, :, layer, e]                                           # [P, N]
    old, new = st.route[:, layer, e], route[:, e]
    on_old = st.on[:, layer, :, e]                                     # [P, M]
    on_new = x @ np.eye(n)[new]
    t = lambda c: st.hw.expert_time(c, server_axis=-1, expected=True)  # noqa: E731
    per += t(on_new) - t(on_old)
    rows += on_new - on_old
    flows[:, src, old] -= x
    flows[:, src, new] += x
    on.append(on_new)
  flows[:, src, src] = 0.0
  flows = np.maximum(flows, 0.0)
  disp, comb = st.hw.exchange_times(flows, -np.expm1(-flows))
  time = disp + comb + st.compute(per, rows, hosts.sum(axis=-1)).max(axis=-1)
  return time, (on, flows, per, rows)


def _commit(st: LayerState, layer: int, columns: list[int], hosts: np.ndarray,
            route: np.ndarray, time: np.ndarray, caches: tuple) -> None:
  on, flows, per, rows = caches
  for e, col in zip(columns, on):
    st.on[:, layer, :, e] = col
  st.flows[:, layer], st.per[:, layer], st.rows[:, layer] = flows, per, rows
  st.hosts[:, layer], st.route[:, layer], st.time[:, layer] = hosts, route, time


class _Proposer:
  """Random changes of one layer's ``(hosts, route)`` columns (module docstring)."""

  def __init__(self, st: LayerState, rng: np.random.Generator):
    self.st, self.rng = st, rng
    self.rank = st.rank.astype(np.int64)                               # [N, M] preference
    self.n = st.shape[0]

  def _drop(self, h: np.ndarray, r: np.ndarray, m: int) -> None:
    h[m] = False
    moved = np.flatnonzero(r == m)
    if moved.size:
      r[moved] = np.argmin(np.where(h[None], self.rank[moved], self.n + 1), axis=1)

  def _add(self, h: np.ndarray, r: np.ndarray, m: int) -> None:
    h[m] = True
    if self.rng.random() < 0.7:
      src = np.arange(self.n)
      r[self.rank[src, m] < self.rank[src, r]] = m
    r[m] = m

  def _exchange(self, layer: int, e: int, hosts: np.ndarray, route: np.ndarray,
                columns: list[int]):
    """An exchange of ``e``'s copy on a random holder with a copy of another expert (module
    docstring), or None when no server can take part."""
    rng = self.rng
    h = hosts[:, e]
    n = int(rng.choice(np.flatnonzero(h)))
    others = np.flatnonzero(~h)
    if others.size == 0:
      return None
    m = int(rng.choice(others))
    give = np.flatnonzero(hosts[m] & ~hosts[n])
    if give.size == 0:
      return None
    e2 = int(rng.choice(give))
    self._add(h, route[:, e], m)
    self._drop(h, route[:, e], n)
    self._add(hosts[:, e2], route[:, e2], n)
    self._drop(hosts[:, e2], route[:, e2], m)
    columns.append(e2)
    return layer, columns, hosts, route, -1, -1

  def propose(self, room: np.ndarray):
    """``(layer, columns, hosts [N, E], route [N, E], take, give)`` or None: a change (the
    layer's new tables, ``columns`` the experts it changes) and the servers whose room falls
    (``take``) and grows (``give``) by one (-1: none)."""
    st, rng = self.st, self.rng
    _, n_layers, n_exp = st.shape
    layer, e = int(rng.integers(n_layers)), int(rng.integers(n_exp))
    kind = int(rng.integers(6))
    hosts, route = st.hosts[:, layer].copy(), st.route[:, layer].copy()
    h, r = hosts[:, e], route[:, e]                                    # views into the copies
    free = np.flatnonzero(~h & (room > 0))
    take = give = -1
    columns = [e]
    if kind in (0, 3, 4) and h.sum() < 2:
      return None
    if kind == 0:                                                      # drop
      give = int(rng.choice(np.flatnonzero(h)))
      self._drop(h, r, give)
    elif kind in (1, 2):                                               # add, move
      if free.size == 0:
        return None
      src = int(rng.choice(np.flatnonzero(h)))
      take = int(rng.choice(free))
      self._add(h, r, take)
      if kind == 2:
        give = src
        self._drop(h, r, src)
    elif kind == 3:                                                    # route
      srcs = np.flatnonzero(~h)
      if srcs.size == 0:
        return None
      s = int(rng.choice(srcs))
      r[s] = int(rng.choice(np.flatnonzero(h & (np.arange(self.n) != r[s]))))
    elif kind == 5:                                                    # exchange
      return self._exchange(layer, e, hosts, route, columns)
    else:                                                              # swap on a server
      m = int(rng.choice(np.flatnonzero(h)))
      lack = np.flatnonzero(~hosts[m])
      if lack.size == 0:
        return None
      self._drop(h, r, m)
      e2 = int(rng.choice(lack))
      self._add(hosts[:, e2], route[:, e2], m)
      columns.append(e2)
    return layer, columns, hosts, route, take, give


def anneal(st: LayerState, capacity: np.ndarray, score_fn: Callable[[np.ndarray], float],
           options: AnnealOptions, rng: np.random.Generator) -> dict:
  """Anneal ``st`` in place (module docstring); it ends in the best state met.

  Args:
    st: the start (its hosts fit ``capacity``).
    capacity: ``[N]`` expert slots of each server (all layers).
    score_fn: the objective of step times ``[P]`` (lower is better).
  Returns:
    ``{"start_score", "score", "tried", "accepted"}``.
  """
  room = np.asarray(capacity, dtype=np.int64) - st.hosts.sum(axis=(1, 2))
  if np.any(room < 0):
    raise PlacementError("anneal: the start placement exceeds a server's capacity.")
  _, n_layers, n_exp = st.shape
  iters = int(options.sweeps * n_layers * n_exp)
  proposer = _Proposer(st, rng)
  step = st.step_times()
  score = start = score_fn(step)
  best = (score, st.hosts.copy(), st.route.copy())
  accepted = 0
  decay = np.log(options.t_end / options.t_start) / max(iters, 1)
  for it in range(iters):
    change = proposer.propose(room)
    if change is None:
      continue
    layer, columns, hosts, route, take, give = change
    t, caches = _price(st, layer, columns, hosts, route)
    new_step = step - st.time[:, layer] + t
    new = score_fn(new_step)
    temp = score * options.t_start * np.exp(decay * it)
    if new >= score and rng.random() >= np.exp(-(new - score) / temp):
      continue
    _commit(st, layer, columns, hosts, route, t, caches)
    step, score = new_step, new
    accepted += 1
    if take >= 0:
      room[take] -= 1
    if give >= 0:
      room[give] += 1
    if score < best[0]:
      best = (score, st.hosts.copy(), st.route.copy())
  st.hosts[...], st.route[...] = best[1], best[2]
  st.refresh(np.arange(n_layers))  # every cache recomputed from the route (no drift)
  return dict(start_score=start, score=score_fn(st.step_times()), tried=iters,
              accepted=accepted)
