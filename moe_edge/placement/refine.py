"""Latency refinement of a placement: prune, move and add expert copies where the cost model's
expected layer time falls.

The placement objective (``objective.py``) charges every remote token-choice its full link time,
so minimising it maximises local coverage. The cost model (``moe_edge/cost/model.py``) prices a
step differently: a layer takes ``dispatch + max_m P[m] + combine``, where ``P[m]`` charges one
weight read per *distinct* expert a server uses (decode is weight-read bound, and slow-memory
servers pay most), a link's latency once per step, and the exchange waits for the busiest NIC.
This module applies exactly the expected-count formulas of ``cost.expected_cost`` per layer,
through the problem's :class:`~moe_edge.core.hardware.Hardware` (calibrated when the problem
is; notation as there; ``x[p, n, l, e] = batch[p, n] * freq[n, l, e]``)::

  on[p, m, l, e]   = sum_{n : route[n, l, e] = m} x[p, n, l, e]
  C[p, l, n, m]    = sum_{e : route[n, l, e] = m != n} x[p, n, l, e]
  P[p, m, l]       = sum_e max(read[m] (1 - exp(-on)), on flop[m])
                     (servers without a grouped kernel: Hardware.compute_time, dense over
                     the slots they hold)
  dispatch[p, l]   = max_n (max_m lat[n, m] (1 - exp(-C)) + sum_m a C / bw[n, m])
  combine[p, l]    = max_m (max_n lat[m, n] (1 - exp(-C)) + sum_n a C / bw[m, n])
  time[p, l]       = dispatch + max_m P + combine

and minimises the score ``sum_p w[p] time[p, l] / S[p]`` of every layer (``S[p]``: the phase's
summed layer time before refinement, so the phases weigh by relative change; the dense part does
not depend on the placement). Layers are independent in the cost model and the route table, so
each layer is refined on its own, all layers vectorised together. Moves per round:

* **prune** a copy whose expert has another copy (never the last one);
* **move** a copy of a bottleneck server (the largest ``P`` of a phase) to a server with room;
* **add** a copy to a server with room.

Each round predicts every candidate's layer score on a routing that re-routes only the changed
expert (nearest copy by ``Hardware.route_cost``, ties within ``slack`` to the least loaded, as
``core.routing.route_table_reference``), applies each layer's best predicted improvement (room taken
by the best gains first), recomputes the real route table of the changed layers
(``core.routing.route_table``, the one the placement ships with) and keeps a change only
when the layer's exact score strictly falls; a rejected candidate is not proposed again until its
layer changes. At most ``max_rounds`` rounds. Every accepted step lowers the exact score, so the
refined placement never scores worse than its input.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import PlacementProblem
from moe_edge.core.routing import route_table

PHASE_WEIGHTS = {"decode": (1.0, 0.0), "prefill": (0.0, 1.0), "both": (0.5, 0.5)}
_REL_TOL = 1e-9  # an accepted change lowers a layer's score by more than this (relative)


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """The expected-count layer-time model of one problem (module docstring): the formulas are
  those of the problem's :class:`~moe_edge.core.hardware.Hardware`.

  Attributes:
    hardware: the problem's hardware (calibrated when the problem was built with one).
    x: ``[P, N, L, E]`` expected token-choices per step of each phase.
    weight: ``[P]`` weight of each phase's layer time in the score (already normalised).
  """
  hardware: Hardware
  x: np.ndarray
  weight: np.ndarray

  @classmethod
  def build(cls, problem: PlacementProblem, batch: np.ndarray,
            weight: np.ndarray) -> "LayerCost":
    """Cost model of ``problem`` with ``batch [P, N]`` tokens per server and step of each phase,
    priced on ``problem.hardware``."""
    x = np.asarray(batch, dtype=np.float64)[:, :, None, None] * problem.freq[None]
    return cls(problem.hardware, x, np.asarray(weight, dtype=np.float64))

  def expert_time(self, on: np.ndarray, m_axis: int) -> np.ndarray:
    """Expected roofline seconds of counts ``on`` whose server axis is ``m_axis``."""
    return self.hardware.expert_time(on, server_axis=m_axis, expected=True)

  def exchange(self, flows: np.ndarray) -> np.ndarray:
    """Dispatch plus combine seconds of ``flows [..., N, M]`` (expected remote choices)."""
    dispatch, combine = self.hardware.exchange_times(flows, -np.expm1(-flows))
    return dispatch + combine

  def compute(self, per: np.ndarray, rows: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``[P, ..., M]`` expert compute of each server from the per-used-expert sums ``per``,
    its ``rows`` and ``held [..., M]`` slots (``Hardware.compute_time``, expected counts)."""
    return self.hardware.compute_time(per, rows, held, server_axis=-1, expected=True)

  def held(self, hosts: np.ndarray | None) -> np.ndarray:
    """``[L', M]`` slots of ``hosts [N, L', E]`` (aligned with the route it prices); None is
    allowed when every server has a grouped kernel (held slots do not matter then)."""
    if hosts is None:
      if self.hardware.grouped is not None and not self.hardware.grouped.all():
        raise PlacementError("a server without a grouped kernel is priced by its held slots: "
                             "pass hosts along with the route.")
      return np.zeros((1, self.hardware.num_servers))
    return np.asarray(hosts).sum(axis=-1).T

  def state(self, route: np.ndarray, layers: np.ndarray | None = None):
    """``(on [P, L', M, E], flows [P, L', N, M], per [P, L', M])`` of ``route [N, L', E]``;
    ``per`` sums :meth:`expert_time` over each server's experts (see :meth:`compute`)."""
    x = self.x if layers is None else self.x[:, :, layers]
    n = route.shape[0]
    to = np.eye(n)[route]                                          # [N, L', E, M]
    on = np.einsum("pnle,nlem->plme", x, to)
    flows = np.einsum("pnle,nlem->plnm", x, to) * (1.0 - np.eye(n))
    per = self.expert_time(on, 2).sum(axis=3)
    return on, flows, per

  def phase_times(self, route: np.ndarray, layers: np.ndarray | None = None,
                  hosts: np.ndarray | None = None) -> np.ndarray:
    """``[P, L']`` expected seconds of each layer (dispatch + slowest server + combine);
    ``hosts [N, L', E]`` as :meth:`held`."""
    on, flows, per = self.state(route, layers)
    per = self.compute(per, on.sum(axis=3), self.held(hosts))
    return self.exchange(flows) + per.max(axis=2)

  def scores(self, route: np.ndarray, layers: np.ndarray | None = None,
             hosts: np.ndarray | None = None) -> np.ndarray:
    """``[L']`` weighted layer scores ``sum_p weight[p] time[p, l]``."""
    return np.einsum("p,pl->l", self.weight, self.phase_times(route, layers, hosts))


DEFAULT_DECODE_TOKENS, DEFAULT_PREFILL_TOKENS = 8.0, 128.0


def phase_batches(problem: PlacementProblem, phase: str, decode_tokens: float | None = None,
                  prefill_tokens: float | None = None,
                  workload=None) -> tuple[np.ndarray, np.ndarray]:
  """``(batch [P, N], weight [P])`` for ``phase``: a step's tokens per server and the phases'
  weights.

  Per phase: a given ``decode_tokens`` / ``prefill_tokens`` is scaled by each server's relative
  request rate ``tokens / mean(tokens)``; else ``workload`` (a
  :class:`~moe_edge.placement.registry.WorkloadSummary`) gives each server's ``decode_batch``
  and ``prefill_tokens`` as the scheduler forms them; else the defaults (8 and 128, scaled).
  """
  if phase not in PHASE_WEIGHTS:
    raise PlacementError(f"refine_phase must be one of {sorted(PHASE_WEIGHTS)}, got {phase!r}.")
  for name, v in (("decode_tokens", decode_tokens), ("prefill_tokens", prefill_tokens)):
    if v is not None and not v > 0:
      raise PlacementError(f"{name}={v} must be positive tokens per server and step.")
  rate = problem.tokens / problem.tokens.mean() if problem.tokens.mean() > 0 else (
      np.ones_like(problem.tokens))

  def one(given, from_workload, default):
    if given is not None:
      return given * rate
    if workload is not None:
      if workload.num_servers != problem.shape[0]:
        raise PlacementError(f"the workload summary has {workload.num_servers} servers but the "
                             f"problem {problem.shape[0]}.")
      return np.asarray(from_workload, dtype=np.float64)
    return default * rate

  batch = np.stack([
      one(decode_tokens, None if workload is None else workload.decode_batch,
          DEFAULT_DECODE_TOKENS),
      one(prefill_tokens, None if workload is None else workload.prefill_tokens,
          DEFAULT_PREFILL_TOKENS)])
  return batch, np.asarray(PHASE_WEIGHTS[phase])


def _predict(cost: LayerCost, hosts, route, on, flows, per, load, route_cost, peak, slack,
             lk, ek, hk):
  """Predicted ``[K]`` scores of candidates: layer ``lk``, expert ``ek``, new hosts ``hk [K, N]``.

  Only the candidate's expert is re-routed: a source hosting it serves itself, a source whose
  old destination still hosts it and stays within ``slack`` of the cheapest keeps it, the others
  take the least loaded (``load / peak``) copy within ``slack`` of the cheapest.
  """
  k, n = hk.shape
  old = route[:, lk, ek].T                                           # [K, S]
  cm = np.where(hk[:, None, :], route_cost[None], np.inf)            # [K, S, M]
  near = cm <= cm.min(axis=2, keepdims=True) * (1.0 + slack)
  keep = np.take_along_axis(near, old[:, :, None], axis=2)[..., 0]
  pick = np.where(near, (load[lk] / peak)[:, None, :], np.inf).argmin(axis=2)
  new = np.where(hk, np.arange(n)[None, :], np.where(keep, old, pick))  # [K, S]
  xk = cost.x[:, :, lk, ek].transpose(0, 2, 1)                        # [P, K, S]
  eye = np.eye(n)
  d_old, d_new = eye[old], eye[new]                                   # [K, S, M]
  on_col = on[:, lk, :, ek].transpose(1, 0, 2)                        # [P, K, M]
  on_new = on_col + np.einsum("pks,ksm->pkm", xk, d_new - d_old)
  per_new = per[:, lk] - cost.expert_time(on_col, 2) + cost.expert_time(on_new, 2)
  rows_new = on.sum(axis=3)[:, lk] - on_col + on_new
  held_new = hosts[:, lk].sum(axis=2).T - hosts[:, lk, ek].T + hk     # [K, M]
  per_new = cost.compute(per_new, rows_new, held_new)
  off = 1.0 - eye
  fl = flows[:, lk] + xk[..., None] * ((d_new - d_old) * off)[None]  # [P, K, S, M]
  times = cost.exchange(fl) + per_new.max(axis=2)                     # [P, K]
  return np.einsum("p,pk->k", cost.weight, times)


def refine(problem: PlacementProblem, hosts: np.ndarray, cost: LayerCost, slack: float = 0.1,
           max_rounds: int = 64, moves: bool = True, adds: bool = True):
  """Greedy latency refinement (module docstring).

  Args:
    hosts: ``[N, L, E]`` bool, every expert hosted, within ``problem.capacity``.
    cost: the layer-time model (its ``weight`` already normalised as wanted).
    slack: the route table's ``slack``.
    max_rounds: bound on rounds (each applies at most one change per layer).
    moves, adds: also try moving copies off bottleneck servers / adding copies into free room.
  Returns:
    ``(hosts, route, stats)``: the refined hosts and their route table, and counts
    (``rounds``, ``pruned``, ``moved``, ``added``, ``rejected``, ``score_before``,
    ``score_after``).
  """
  traffic = problem.traffic
  hosts = np.array(hosts, dtype=bool)
  n, nl, e = hosts.shape
  hw = problem.hardware
  route = route_table(hosts, hw, traffic, slack)
  route_cost, peak = hw.route_cost(), hw.flops
  room = problem.capacity - hosts.sum(axis=(1, 2))
  score = cost.scores(route, hosts=hosts)
  before = float(score.sum())
  banned = np.zeros((nl, 3, n, n, e), dtype=bool)  # [layer, kind, from, to, expert]
  stats = dict(rounds=0, pruned=0, moved=0, added=0, rejected=0)
  lidx = np.arange(nl)
  for _ in range(max_rounds):
    on, flows, per = cost.state(route)
    busy = cost.compute(per, on.sum(axis=3), cost.held(hosts))      # [P, L, M]
    load = np.einsum("nle,nlem->lm", traffic, np.eye(n)[route])     # [L, M] planning loads
    count = hosts.sum(axis=0)                                       # [L, E]
    cand = []  # (kind, layer, from, to, expert)
    nn, ll, ee = np.nonzero(hosts & (count[None] >= 2))
    cand.append((np.zeros_like(ll), nn, nn, ll, ee))   # prune: from = to = n
    if moves or adds:
      free = room > 0
      if adds:
        nn, ll, ee = np.nonzero(~hosts & free[:, None, None])
        cand.append((np.full_like(ll, 2), nn, nn, ll, ee))
      if moves and free.any():
        bott = np.zeros((nl, n), dtype=bool)
        bott[np.repeat(lidx, busy.shape[0]), busy.argmax(axis=2).T.ravel()] = True
        src_n, src_l, src_e = np.nonzero(hosts & bott.T[:, :, None])
        for m in np.flatnonzero(free):
          ok = ~hosts[m, src_l, src_e]
          cand.append((np.ones(ok.sum(), dtype=np.int64), src_n[ok],
                       np.full(ok.sum(), m), src_l[ok], src_e[ok]))
    kind, frm, to, lk, ek = (np.concatenate(c) for c in zip(*cand))
    live = ~banned[lk, kind, frm, to, ek]
    kind, frm, to, lk, ek = kind[live], frm[live], to[live], lk[live], ek[live]
    if kind.size == 0:
      break
    hk = hosts[:, lk, ek].T.copy()                                  # [K, N]
    kk = np.arange(kind.size)
    hk[kk, frm] &= kind == 2
    hk[kk, to] |= kind >= 1
    pred = _predict(cost, hosts, route, on, flows, per, load, route_cost, peak, slack,
                    lk, ek, hk)
    gain = score[lk] - pred
    good = gain > _REL_TOL * score[lk]
    if not good.any():
      break
    # Each layer's best candidate; room goes to the largest gains first.
    g = np.flatnonzero(good)
    g = g[np.lexsort((-gain[g], lk[g]))]
    g = g[np.unique(lk[g], return_index=True)[1]]
    g = g[np.argsort(-gain[g], kind="stable")]
    need = kind[g] >= 1
    tgt = to[g]
    nth = np.zeros(g.size, dtype=np.int64)
    for s in np.unique(tgt[need]):
      sel = np.flatnonzero(need & (tgt == s))
      nth[sel] = np.arange(sel.size)
    g = g[~need | (nth < room[tgt])]
    stats["rounds"] += 1
    layers = np.sort(lk[g])
    g = g[np.argsort(lk[g], kind="stable")]
    trial = hosts[:, layers].copy()
    trial[:, np.arange(layers.size), ek[g]] = hk[g].T
    t_route = route_table(trial, hw, traffic[:, layers], slack)
    t_score = cost.scores(t_route, layers, trial)
    ok = t_score < score[layers] * (1.0 - _REL_TOL)
    acc, rej = g[ok], g[~ok]
    banned[lk[rej], kind[rej], frm[rej], to[rej], ek[rej]] = True
    stats["rejected"] += int(rej.size)
    if acc.size:
      la = layers[ok]
      banned[la] = False
      hosts[:, la] = trial[:, ok]
      route[:, la] = t_route[:, ok]
      score[la] = t_score[ok]
      room -= np.bincount(to[acc], weights=(kind[acc] >= 1), minlength=n).astype(np.int64)
      room += np.bincount(frm[acc], weights=(kind[acc] <= 1), minlength=n).astype(np.int64)
      for name, kd in (("pruned", 0), ("moved", 1), ("added", 2)):
        stats[name] += int((kind[acc] == kd).sum())
  stats.update(score_before=before, score_after=float(score.sum()))
  return hosts, route, stats
