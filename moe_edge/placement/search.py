"""Latency search: a placement that minimises the expected request latency on the cost model.

Objective: ``moe_edge.cost.request_latency`` -- the workload's mean request latency (each
server's request rate, prompt and output lengths, prefill and decode steps at the batch sizes
the scheduler forms, M/D/1 queueing) as a function of the expected decode and prefill step times
``(T_d, T_p)`` of ``CostModel.expected``. Both are ``dense + sum_l time[l]``, and a layer's time
depends only on that layer's copies and routes (``layer_state.py``), so the search works layer by
layer on exact per-layer times and combines them through the objective.

1. **Start**: the methods of ``options.starts`` (dancemoe, eplb_hetero, eplb, uniform_ep and
   prism by default, each in milliseconds to a second) are placed and scored; the best is the
   start (its own route table kept).
2. **Rounds**: each round draws candidate changes in every layer (seeded; ``options.candidates``
   of each kind per layer on up to 8 servers, scaled by ``(8 / N)^2`` above): *drop* a copy whose
   expert has another; *add* a copy (the server's hotter experts likelier); *move* a copy to a
   server with room; *swap* inside a server (drop a duplicate, add an expert it lacks);
   *exchange* two copies between two servers. Every candidate is *screened* in ``O(N)``
   (``LayerState.screen``: compute and bytes exact, link latency terms as they are), the best
   ``options.verify`` of each layer are priced exactly (``LayerState.evaluate``; the changed
   columns re-routed to their nearest copy), and scored by the objective's gradient
   ``g_d dtime_d + g_p dtime_p``. Each layer takes up to ``options.per_layer`` of its verified
   improving candidates on distinct experts, best gains first, within each server's memory; a
   *chain* then pairs, per full server, its best add in one layer with its best drop in another
   (memory moves between layers). The round's changes are kept when the exact objective falls;
   otherwise one change per layer is tried, then the single best change.
3. **Widen, then stop**: after ``options.patience`` rounds without improvement the candidates
   and exact checks per layer double (at most ``options.widen`` times); the search stops after
   ``patience`` more such rounds at the widest, or after ``options.max_rounds``.

Deterministic for ``context.seed``; never worse than its start. ``best_known`` (role oracle) is
the same search, longer (more candidates and rounds), continued from the fast search's result and
run from every start method's placement and, where ``lp_start_max_cells`` allows, from the
facility-location LP's rounded hosting (``lp_bound.py``; in the tables it made best_known 1.2-4.0%
better on OLMoE, DeepSeek-V2-Lite and Qwen with 8 servers), the best result kept, then **annealed**
(``anneal.py``: simulated annealing over single changes of hosts *and* routes, a different
family of optimiser that can leave the rounds' local optima; on the tables' settings best_known
fell 0.2-2.7% with it and the wider fast search it continues from): the reference the fast
search's gap is measured against.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost.request_latency import (latency_gradient, request_latency,
                                           workload_batches)
from moe_edge.placement import registry
from moe_edge.placement.anneal import AnnealOptions, anneal
from moe_edge.placement.common import finish
from moe_edge.placement.judged import judged_choice
from moe_edge.placement.bounds import compute_bound, phase_choices
from moe_edge.placement.layer_state import LayerState
from moe_edge.placement.lp_bound import lp_cells, lp_phase_bound, rounded_hosts
from moe_edge.placement.registry import PlacementContext, WorkloadSummary, register

FAST_STARTS = ("dancemoe", "prism", "eplb_hetero", "eplb", "uniform_ep", "redundance",
               "smartmoe", "greedy_local", "topology_aware")
# the fast search's starts: those that won on the development instances (each costs a
# placement); best_known starts from all of FAST_STARTS
SEARCH_STARTS = ("dancemoe", "eplb_hetero", "eplb", "uniform_ep", "prism")
_TOL = 1e-12
_REF_SERVERS = 8  # candidates are per layer at this many servers; a candidate costs O(N)
_UNSTABLE = 1e6  # score offset of a workload whose queues diverge (seconds)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """Options of :func:`latency_search`.

  Attributes:
    starts: registered fast methods whose best placement (under the objective) is the start.
    candidates: candidates of each kind per layer and round on up to 8 servers (scaled by
      ``(8 / N)^2`` above, at least 4).
    max_rounds: at most this many rounds.
    patience: stop after this many rounds without improvement.
    verify: candidates per layer and round whose screened gain is verified exactly (the
      screening prices the exchange's bytes, not its latency terms; ``layer_state.py``); on
      up to 8 servers, scaled by ``(8 / N)^2`` above (at least 2: an exact check costs
      ``O(N^2)``).
    per_layer: changes per layer and round (on distinct experts).
    widen: times the neighbourhood doubles (candidates and exact checks per layer) when
      ``patience`` rounds bring nothing, before the search stops.
    restarts: also search from the next-best ``restarts`` starts and keep the best result.
    anneal_sweeps: then anneal the best result (``anneal.py``: single changes of hosts and
      routes, Metropolis acceptance) with this many changes per expert column (scaled by
      ``(8 / N)^2`` above 8 servers, like the budgets); 0 skips it.
    small_size, small_widen: on problems of at most ``small_size`` cells ``N * L * E`` (where a
      round is cheap) the neighbourhood may widen ``max(widen, small_widen)`` times.
    judge_final: when the context carries a judge (``PlacementContext.judge``: a short
      simulation on profiling requests), return whichever of the search's result and the start
      methods' placements the judge finds fastest (``placement/judged.py``); without a judge,
      or with False, the search's result.
  """
  starts: tuple[str, ...] = SEARCH_STARTS
  candidates: int = 48
  max_rounds: int = 60
  patience: int = 3
  verify: int = 12
  per_layer: int = 6
  widen: int = 0
  restarts: int = 0
  anneal_sweeps: float = 0.0
  judge_final: bool = True
  small_size: int = 4096
  small_widen: int = 2

  def __post_init__(self):
    if not self.starts:
      raise PlacementError("latency_search: starts must name at least one method.")
    for name, v, lo in (("candidates", self.candidates, 1), ("max_rounds", self.max_rounds, 0),
                        ("patience", self.patience, 1), ("verify", self.verify, 1),
                        ("per_layer", self.per_layer, 1), ("widen", self.widen, 0),
                        ("restarts", self.restarts, 0), ("small_size", self.small_size, 0),
                        ("small_widen", self.small_widen, 0)):
      if int(v) != v or v < lo:
        raise PlacementError(f"latency_search: {name}={v!r} must be an integer >= {lo}.")
    if not self.anneal_sweeps >= 0:
      raise PlacementError(f"latency_search: anneal_sweeps={self.anneal_sweeps!r} must be a "
                           f"number >= 0.")


@dataclasses.dataclass(frozen=True)
class BestKnownOptions(SearchOptions):
  """Options of :func:`best_known`: the search's, long (twice the candidates per layer, up to
  400 rounds, patience 8, the neighbourhood widened twice; 3 changes per layer and round), from
  every start, then annealed (100 changes per expert column).

  ``lp_start_max_cells``: on problems of at most this many LP routing variables
  (``lp_bound.lp_cells``; 0: never) also search from the facility-location LP's hosting
  (``lp_bound.py``) of the phase that weighs most in the objective, rounded to a placement
  (``rounded_hosts``): a start from outside the fast methods' basins. It costs the LP (about 2
  minutes for OLMoE on 8 servers; the lower bound then reuses it).
  """
  starts: tuple[str, ...] = FAST_STARTS
  candidates: int = 96
  max_rounds: int = 400
  patience: int = 8
  verify: int = 12
  per_layer: int = 3
  widen: int = 2
  restarts: int = len(FAST_STARTS) - 1
  anneal_sweeps: float = 100.0
  lp_start_max_cells: int = 0

  def __post_init__(self):
    super().__post_init__()
    if int(self.lp_start_max_cells) != self.lp_start_max_cells or self.lp_start_max_cells < 0:
      raise PlacementError(f"best_known: lp_start_max_cells={self.lp_start_max_cells!r} must be "
                           f"an integer >= 0 (0: no LP start).")


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def objective_score(step: np.ndarray, workload) -> float:
  """Mean request latency of step times ``step = [T_d, T_p]``; a diverging workload scores
  ``_UNSTABLE`` plus its no-wait latency (so placements that serve it faster still rank)."""
  lat = request_latency(float(step[0]), float(step[1]), workload)
  if lat.stable:
    return lat.mean
  w = np.asarray(workload.request_rate, dtype=np.float64)
  w = w / w.sum()
  return _UNSTABLE + float(np.sum(w * (lat.prefill + lat.decode)))


def objective_weights(step: np.ndarray, workload) -> np.ndarray:
  """``[2]`` weights of a layer's decode and prefill time in the score (its gradient)."""
  g = latency_gradient(float(step[0]), float(step[1]), workload)
  if np.isfinite(g[0]):
    return np.asarray(g)
  lat = request_latency(float(step[0]), float(step[1]), workload)
  w = np.asarray(workload.request_rate, dtype=np.float64)
  w = w / w.sum()
  return np.array([np.sum(w * lat.decode) / max(step[0], 1e-30),
                   np.sum(w * lat.prefill) / max(step[1], 1e-30)])


def search_setup(problem: PlacementProblem, context):
  """``(hardware, workload)`` of a context: its cost model's hardware (else the datasheet) and
  its workload summary (else :func:`default_workload`)."""
  hw = context.cost.hardware if context.cost is not None else problem.hardware
  workload = context.workload
  if workload is None:
    workload = default_workload(problem)
  n = problem.shape[0]
  if np.shape(workload.request_rate) != (n,):
    raise PlacementError(f"the workload summary describes {np.shape(workload.request_rate)} "
                         f"servers but the problem has {n}; build it for this cluster.")
  return hw, workload


def default_workload(problem: PlacementProblem):
  """The paper's specialised workload shape when none is given: one request per 10 s per
  server on average (scaled by ``problem.tokens``), 320-token prompts (the middle of 128-512),
  128 output tokens, 8 concurrent decoding requests and one prompt per prefill step."""
  n = problem.shape[0]
  share = problem.tokens / problem.tokens.mean() if problem.tokens.mean() > 0 else np.ones(n)
  return WorkloadSummary(request_rate=0.1 * share, prompt_tokens=np.full(n, 320.0),
                         output_tokens=np.full(n, 128.0), decode_batch=np.full(n, 8.0),
                         prefill_tokens=np.full(n, 320.0))


def placement_score(problem: PlacementProblem, placement: Placement, hw, workload) -> float:
  """The objective of ``placement`` (its own route table)."""
  st = LayerState.build(hw, problem.freq, np.stack(workload_batches(workload)),
                        placement.hosts, placement.route)
  return objective_score(st.step_times(), workload)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Cands:
  """Candidate changes: layer, one or two (expert, host column), and the memory they move."""
  lk: np.ndarray
  ek: np.ndarray
  hk: np.ndarray
  e2: np.ndarray
  h2: np.ndarray
  take: np.ndarray   # server whose room falls by one (-1 none)
  give: np.ndarray   # server whose room grows by one (-1 none)


def _pick(rng: np.random.Generator, mask: np.ndarray, size: int) -> np.ndarray:
  """``[size, mask.ndim]`` indices of random True entries of ``mask`` (with replacement)."""
  idx = np.flatnonzero(mask.ravel())
  if idx.size == 0 or size <= 0:
    return np.zeros((0, mask.ndim), dtype=np.int64)
  return np.stack(np.unravel_index(rng.choice(idx, size=size), mask.shape), axis=1)


def _choose(rng: np.random.Generator, score: np.ndarray, allowed: np.ndarray) -> np.ndarray:
  """Per row, the argmax of ``score`` randomly scaled by 0.25..1.25, among ``allowed`` (-1
  where a row allows nothing): hot entries are likely, not certain."""
  key = np.where(allowed, score * (0.25 + rng.random(score.shape)), -1.0)
  best = np.argmax(key, axis=-1)
  return np.where(allowed.any(axis=-1), best, -1)


def candidates(st: LayerState, room: np.ndarray, heat: np.ndarray, rng: np.random.Generator,
               k: int) -> _Cands:
  """Draw the round's candidates (module docstring, step 2); ``heat [N, L, E]`` ranks adds."""
  hosts = st.hosts
  n, l, e = hosts.shape
  count = hosts.sum(axis=0)
  spare = hosts & (count >= 2)[None]
  m = k * l
  parts = []

  def col(li, ei):
    return hosts[:, li, ei].T.copy()

  # drop
  d = np.argwhere(spare)
  if len(d) > m:
    d = d[np.sort(rng.choice(len(d), size=m, replace=False))]
  h = col(d[:, 1], d[:, 2])
  h[np.arange(len(d)), d[:, 0]] = False
  parts.append((d[:, 1], d[:, 2], h, None, None, np.full(len(d), -1), d[:, 0]))
  # add (any server; a full server's adds only serve chains)
  srv = rng.integers(0, n, size=m)
  lay = np.repeat(np.arange(l), k)
  ex = _choose(rng, heat[srv, lay], ~hosts[srv, lay])
  ok = ex >= 0
  srv, lay, ex = srv[ok], lay[ok], ex[ok]
  h = col(lay, ex)
  h[np.arange(len(ex)), srv] = True
  parts.append((lay, ex, h, None, None, srv, np.full(len(ex), -1)))
  # move a copy to a server with room
  src = _pick(rng, hosts, m)
  if len(src) and (room > 0).any():
    dst = rng.choice(np.flatnonzero(room > 0), size=len(src))
    ok = ~hosts[dst, src[:, 1], src[:, 2]]
    src, dst = src[ok], dst[ok]
    h = col(src[:, 1], src[:, 2])
    h[np.arange(len(src)), src[:, 0]] = False
    h[np.arange(len(src)), dst] = True
    parts.append((src[:, 1], src[:, 2], h, None, None, dst, src[:, 0]))
  # swap inside a server: drop a duplicate, add an expert it lacks
  s = _pick(rng, spare, m)
  if len(s):
    e2 = _choose(rng, heat[s[:, 0], s[:, 1]], ~hosts[s[:, 0], s[:, 1]])
    ok = e2 >= 0
    s, e2 = s[ok], e2[ok]
    h = col(s[:, 1], s[:, 2])
    h[np.arange(len(s)), s[:, 0]] = False
    g = col(s[:, 1], e2)
    g[np.arange(len(s)), s[:, 0]] = True
    parts.append((s[:, 1], s[:, 2], h, e2, g, np.full(len(s), -1), np.full(len(s), -1)))
  # exchange: n's copy of e1 goes to m, m's copy of e2 goes to n
  c = _pick(rng, hosts, m)
  if len(c) and n > 1:
    other = (c[:, 0] + rng.integers(1, n, size=len(c))) % n
    ok = ~hosts[other, c[:, 1], c[:, 2]]
    c, other = c[ok], other[ok]
    allowed = hosts[other, c[:, 1]] & ~hosts[c[:, 0], c[:, 1]]
    e2 = _choose(rng, np.ones(allowed.shape), allowed)
    ok = e2 >= 0
    c, other, e2 = c[ok], other[ok], e2[ok]
    h = col(c[:, 1], c[:, 2])
    h[np.arange(len(c)), c[:, 0]] = False
    h[np.arange(len(c)), other] = True
    g = col(c[:, 1], e2)
    g[np.arange(len(c)), other] = False
    g[np.arange(len(c)), c[:, 0]] = True
    parts.append((c[:, 1], c[:, 2], h, e2, g, np.full(len(c), -1), np.full(len(c), -1)))
  cat = lambda i, fill: np.concatenate([p[i] if p[i] is not None else fill(p) for p in parts])  # noqa
  return _Cands(cat(0, None).astype(np.int64), cat(1, None).astype(np.int64), cat(2, None),
                cat(3, lambda p: np.full(len(p[0]), -1)).astype(np.int64),
                cat(4, lambda p: np.zeros((len(p[0]), n), dtype=bool)),
                cat(5, None).astype(np.int64), cat(6, None).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------
def _select(c: _Cands, gain: np.ndarray, room: np.ndarray, n_layers: int,
            per_layer: int) -> list[list[int]]:
  """The round's changes (module docstring): up to ``per_layer`` candidates of each layer on
  distinct experts, best gains first, within memory, then chains; each change is a list of
  candidate indices (one, or a drop and an add)."""
  room = room.copy()
  count = np.zeros(n_layers, dtype=np.int64)
  touched = set()
  chosen = []
  live = np.flatnonzero(gain > 0)
  for i in live[np.argsort(-gain[live], kind="stable")]:
    li, cols = int(c.lk[i]), {(int(c.lk[i]), int(c.ek[i])), (int(c.lk[i]), int(c.e2[i]))}
    if count[li] >= per_layer or cols & touched or (
        c.take[i] >= 0 and room[c.take[i]] <= 0 and c.take[i] != c.give[i]):
      continue
    touched |= cols
    if c.take[i] >= 0:
      room[c.take[i]] -= 1
    if c.give[i] >= 0:
      room[c.give[i]] += 1
    chosen.append([int(i)])
    count[li] += 1
  used = count > 0
  # chains: a full server's best add in one layer paid by its best drop in another
  drops = np.flatnonzero((c.give >= 0) & (c.take < 0))
  adds = np.flatnonzero((c.take >= 0) & (c.give < 0))
  for s in np.flatnonzero(room <= 0):
    a = adds[(c.take[adds] == s) & ~used[c.lk[adds]]]
    d = drops[(c.give[drops] == s) & ~used[c.lk[drops]]]
    if a.size == 0 or d.size == 0:
      continue
    a = a[np.argsort(-gain[a], kind="stable")]
    d = d[np.argsort(-gain[d], kind="stable")]
    best = None
    for ai in a[:4]:
      for di in d[:4]:
        if c.lk[ai] != c.lk[di] and gain[ai] + gain[di] > 0 and (
            best is None or gain[ai] + gain[di] > gain[best[0]] + gain[best[1]]):
          best = (int(ai), int(di))
    if best is not None:
      used[c.lk[list(best)]] = True
      chosen.append(list(best))
  return chosen


def _top_per_layer(lk: np.ndarray, score: np.ndarray, t: int) -> np.ndarray:
  """Indices of the ``t`` highest ``score`` of each layer (ties to the lower index)."""
  order = np.lexsort((-score, lk))
  start = np.searchsorted(lk[order], lk[order], side="left")
  keep = order[np.arange(order.size) - start < t]
  return np.sort(keep)


def _apply(st: LayerState, c: _Cands, change: list[int]) -> None:
  for i in change:
    experts, cols = [int(c.ek[i])], [c.hk[i]]
    if c.e2[i] >= 0:
      experts.append(int(c.e2[i]))
      cols.append(c.h2[i])
    st.apply(int(c.lk[i]), experts, cols, refresh=False)


def _try(st: LayerState, c: _Cands, changes: list[list[int]], workload, score: float,
         capacity: np.ndarray):
  """Apply ``changes``; keep them when every server stays within ``capacity`` and the exact
  score falls. Returns the new score or None (nothing changed)."""
  layers = np.unique(np.concatenate([c.lk[ch] for ch in changes]))
  saved = st.snapshot(layers)
  for ch in changes:
    _apply(st, c, ch)
  fits = np.all(st.hosts.sum(axis=(1, 2)) <= capacity)
  if fits:
    st.settle(layers)
    new = objective_score(st.step_times(), workload)
    if new < score * (1.0 - _TOL):
      return new
  st.restore(layers, saved)
  return None


def improve(st: LayerState, capacity: np.ndarray, workload, options: SearchOptions,
            rng: np.random.Generator) -> dict:
  """Run the rounds on ``st`` in place (module docstring, steps 2-3); returns statistics."""
  room = np.asarray(capacity, dtype=np.int64) - st.hosts.sum(axis=(1, 2))
  heat = st.x.sum(axis=0)                       # [N, L, E]: a server's own traffic per expert
  score = objective_score(st.step_times(), workload)
  stats = dict(start_score=score, rounds=0, accepted=0, evaluated=0, verified=0)
  stall = 0
  n = st.shape[0]
  ref = _REF_SERVERS ** 2  # budgets fall as (8 / N)^2 above 8 servers (a candidate's re-route
  # and exact check cost O(N^2)), at least the floors of the options' docstring
  scale = lambda v, lo: max(lo, -(-v * ref // max(n, _REF_SERVERS) ** 2))  # noqa: E731
  per_kind, per_verify = scale(options.candidates, 4), scale(options.verify, 2)
  widened = 0
  max_widen = max(options.widen, options.small_widen) if st.hosts.size <= options.small_size \
      else options.widen
  for _ in range(options.max_rounds):
    g = objective_weights(st.step_times(), workload)
    c = candidates(st, room, heat, rng, per_kind)
    stats["rounds"] += 1
    stats["evaluated"] += int(c.lk.size)
    if c.lk.size == 0:
      break
    approx = -np.einsum("p,pk->k", g, st.screen(c.lk, c.ek, c.hk, c.e2, c.h2)
                        - st.time[:, c.lk])
    top = _top_per_layer(c.lk, approx, per_verify)
    gain = np.zeros(c.lk.size)
    gain[top] = -np.einsum("p,pk->k", g, st.evaluate(c.lk[top], c.ek[top], c.hk[top],
                                                      c.e2[top], c.h2[top])
                           - st.time[:, c.lk[top]])
    stats["verified"] += int(top.size)
    gain[gain <= _TOL * score] = 0.0
    changes = _select(c, gain, room, st.shape[1], options.per_layer)
    new = _try(st, c, changes, workload, score, capacity) if changes else None
    if new is None and options.per_layer > 1 and len(changes) > 1:
      changes = _select(c, gain, room, st.shape[1], 1)       # one per layer
      new = _try(st, c, changes, workload, score, capacity)
    if new is None and len(changes) > 1:
      best = int(np.argmax([gain[ch].sum() for ch in changes]))
      changes = changes[best:best + 1]
      new = _try(st, c, changes, workload, score, capacity)
    if new is None:
      stall += 1
      if stall >= options.patience and widened < max_widen:
        widened, stall = widened + 1, 0                # a local optimum of this neighbourhood:
        per_kind, per_verify = 2 * per_kind, 2 * per_verify  # search a wider one
      elif stall >= options.patience:
        break
      continue
    stall = 0
    score = new
    stats["accepted"] += len(changes)
    room = np.asarray(capacity, dtype=np.int64) - st.hosts.sum(axis=(1, 2))
  st.refresh(np.arange(st.shape[1]))  # the incremental caches recomputed from the route
  stats["score"] = objective_score(st.step_times(), workload)
  return stats


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
def ranked_starts(problem: PlacementProblem, options: SearchOptions, context, hw,
                  workload) -> list[tuple[float, str, Placement]]:
  """``(score, name, placement)`` of every start method, best first (ties by name order)."""
  out = []
  for i, name in enumerate(options.starts):
    p = registry.place(name, problem, context=context)
    out.append((placement_score(problem, p, hw, workload), i, name, p))
  out.sort(key=lambda t: (t[0], t[1]))
  return [(s, name, p) for s, _, name, p in out]


def run_search(problem: PlacementProblem, options: SearchOptions, context, method: str,
               first: Placement | None = None, more: tuple[Placement, ...] = ()) -> Placement:
  """Steps 1-3 from the best start (and ``options.restarts`` more); the best result wins.
  ``first``: a placement searched from before the start methods (``best_known`` passes the
  fast search's result, so it is never worse than it); ``more``: placements searched from
  after them (the LP's start; the other runs keep their seeds)."""
  t0 = time.perf_counter()
  hw, workload = search_setup(problem, context)
  seed = int(context.seed)
  starts = ranked_starts(problem, options, context, hw, workload)
  runs_from = starts[:1 + options.restarts]
  if first is not None:
    runs_from = [(placement_score(problem, first, hw, workload), first.method, first)] + runs_from
  runs_from += [(placement_score(problem, p, hw, workload), p.method, p) for p in more]
  batches = np.stack(workload_batches(workload))
  best = None
  runs = []
  for j, (s0, name, p) in enumerate(runs_from):
    st = LayerState.build(hw, problem.freq, batches, p.hosts, p.route)
    stats = improve(st, problem.capacity, workload, options,
                    np.random.default_rng([seed, j]))
    runs.append(dict(start=name, start_score=s0, **{k: v for k, v in stats.items()
                                                   if k != "start_score"}))
    if best is None or stats["score"] < best[0]:
      best = (stats["score"], st.hosts.copy(), st.route.copy(), name)
  info = dict(seed=seed, start=best[3], score=best[0], start_score=starts[0][0], runs=runs,
              starts={name: s for s, name, _ in starts})
  if options.anneal_sweeps > 0:
    st = LayerState.build(hw, problem.freq, batches, best[1], best[2])
    stats = anneal(st, problem.capacity, lambda t: objective_score(t, workload),
                   AnnealOptions(sweeps=options.anneal_sweeps
                                 * min(1.0, (_REF_SERVERS / problem.shape[0]) ** 2)),
                   np.random.default_rng([seed, len(runs_from)]))
    info["anneal"] = stats
    if stats["score"] < best[0]:
      best = (stats["score"], st.hosts.copy(), st.route.copy(), best[3])
      info["score"] = best[0]
  return finish(problem, best[1], method, t0, info, route=best[2])


@register("latency_search", "ours", SearchOptions, label="LatencySearch")
def latency_search(problem: PlacementProblem, options: SearchOptions = SearchOptions(),
                   context: PlacementContext = PlacementContext()) -> Placement:
  """The fast latency search (module docstring); with a judge in the context (and
  ``options.judge_final``) the judged fastest of its result and its starts' placements."""
  found = run_search(problem, options, context, "latency_search")
  if not (options.judge_final and context.judge is not None):
    return found
  starts = [registry.place(m, problem, context=context) for m in options.starts]
  return judged_choice([found] + starts, context.judge, "latency_search")


@register("best_known", "oracle", BestKnownOptions)
def best_known(problem: PlacementProblem, options: BestKnownOptions = BestKnownOptions(),
               context: PlacementContext = PlacementContext()) -> Placement:
  """The long search from the fast search's result and from every start: the best latency
  this project knows per instance (never worse than ``latency_search`` with its defaults)."""
  fast = latency_search(problem, SearchOptions(judge_final=False), context)
  more = ()
  if 0 < lp_cells(problem.shape) <= options.lp_start_max_cells:
    start = lp_start(problem, context, fast)
    more = () if start is None else (start,)
  return run_search(problem, options, context, "best_known", first=fast, more=more)


def lp_start(problem: PlacementProblem, context, reference: Placement) -> Placement | None:
  """The facility-location LP's hosting (``lp_bound.py``) of the phase with the larger share
  ``g_p T_p`` of the objective at ``reference``, rounded to a placement (nearest-copy routes);
  None when the LP is not solved."""
  t0 = time.perf_counter()
  hw, workload = search_setup(problem, context)
  batches = workload_batches(workload)
  st = LayerState.build(hw, problem.freq, np.stack(batches), reference.hosts, reference.route)
  step = st.step_times()
  phase = int(np.argmax(objective_weights(step, workload) * step))
  x = phase_choices(problem.freq, batches[phase])
  _, sol = lp_phase_bound(hw, x, problem.capacity, compute_bound(hw, x)[0], solution=True)
  if sol is None:
    return None
  return finish(problem, rounded_hosts(sol["h"], problem.capacity), "lp_start", t0,
                dict(phase=("decode", "prefill")[phase]))
