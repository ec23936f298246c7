r"""The workload-shift run: multidata, then specialised, under three migration policies.

All three start from one placement (``shift_method`` planned on ``shift_from``'s expected
problem) and serve the same requests; each decides from what the simulation's routing-count
window saw in the last ``stats_window_s`` seconds (:class:`~moe_edge.serving.
simulator.Window`: token-choices per server, layer and expert; tokens and steps), as a
:class:`PlacementProblem` (``freq`` = counts per token, a server without tokens keeps its last
frequencies; ``tokens`` = tokens per step).

* ``none``: keeps the initial placement.
* ``paper`` (PAPER.md, "Migration"): every ``paper_replan_s`` a candidate is re-planned from
  scratch with ``prism``; it is adopted when its communication cost over the next interval plus
  the migration cost is below the current placement's communication cost::

    comm(x) = T * sum_{n, l, e} r[n, l, e] * link[n, route_x[n, l, e]]

  with ``r`` the window's token-choices per second, ``link`` the link time of one remote
  token-choice there and back (:meth:`Hardware.link_time_per_token`; 0 when local) and ``T``
  the interval. The migration cost is the copies' transfer time on this testbed, the
  repository's copy schedule over the links (:func:`moe_edge.migration.move_cost`): the
  paper's "size over I/O bandwidth" with the bandwidth being the edge links here.
* ``ours``: the repository's trigger (:mod:`moe_edge.migration.trigger`) every
  ``ours_check_s``: an incremental plan of at most ``ours_max_moves`` copies
  (:func:`~moe_edge.migration.plan_incremental`), every prefix judged with held-out savings
  (two-fold over the window's alternate bins, :func:`~moe_edge.migration.
  cross_validated_savings`; :func:`~moe_edge.migration.choose_prefix`), the saving weighed
  over the same horizon as the paper's rule (``paper_replan_s`` of serving steps at the
  window's step rate). The step latency is scored as ``ours_scoring`` says
  (:func:`~moe_edge.migration.trigger_score`): ``"serving"`` (the paper presets) prices the
  window's own step mix (:meth:`Window.mix <moe_edge.serving.window.Window.mix>`: decode steps
  and the prefill steps each server led, at the batches the scheduler formed), so the saving is
  the change of the serving seconds this prefill-heavy workload pays; ``"decode"`` is the mean
  batch of ``tokens / steps`` (the repository's default trigger). ``ours_safety`` and
  ``ours_interference`` are the trigger's factors.

Serving stalls while weights move, for both (so ``interference = 1`` is exact here).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.experiments.paper_config import PaperConfig
from moe_edge.experiments.paper_table import Planned, plan_setting, serve
from moe_edge.experiments.paper_workload import shift_requests
from moe_edge.migration import (StepMix, choose_prefix, cross_validated_savings, move_cost,
                                move_sequence, plan_incremental, plan_prefix, trigger_score)
from moe_edge.placement import registry
from moe_edge.serving.simulator import SimResult, Window

SHIFT_COLUMNS = ("policy", "bin_start_s", "requests", "mean_latency_s", "p99_latency_s",
                 "migrations")


def window_problem(planned: Planned, window: Window, t0: float, t1: float, last: np.ndarray,
                   parity: int | None = None) -> PlacementProblem | None:
  """The window's statistics as a problem (module docstring); None when it saw no step."""
  counts, tokens, steps = window.totals(t0, t1, parity)
  if steps == 0 or tokens.sum() == 0:
    return None
  seen = tokens > 0
  freq = np.where(seen[:, None, None], counts / np.maximum(tokens, 1)[:, None, None], last)
  p = planned.problem
  return PlacementProblem.build(p.model, p.cluster, freq, tokens / steps, p.capacity,
                                planned.cost.calibration)


def comm_seconds(planned: Planned, rate: np.ndarray, placement: Placement,
                 interval_s: float) -> float:
  """``comm(x)`` of the module docstring: link seconds of the remote token-choices."""
  link = planned.cost.hardware.link_time_per_token()                       # [N, M], 0 local
  n = np.arange(rate.shape[0])[:, None, None]
  return float(interval_s * np.sum(rate * link[n, placement.route]))


def _tagged(placement: Placement, copies: int, note: str) -> Placement:
  return dataclasses.replace(placement, info=dict(placement.info, copies=copies, note=note))


class _Policy:
  """Shared state of a policy's controller: the planned setting and the last frequencies."""

  def __init__(self, cfg: PaperConfig, planned: Planned):
    self.cfg, self.planned = cfg, planned
    self.last = planned.problem.freq
    self.log: list[str] = []

  def problem(self, window: Window, t: float, parity: int | None = None):
    prob = window_problem(self.planned, window, t - self.cfg.stats_window_s, t, self.last,
                          parity)
    if prob is not None and parity is None:
      self.last = prob.freq
    return prob

  def move(self, current: Placement, target: Placement, sequence=None):
    p = self.planned.problem
    return move_cost(current, target, p.model, p.cluster, p.capacity, sequence=sequence)


class PaperPolicy(_Policy):
  """``paper``: re-plan with prism, adopt when comm + move cost falls (module docstring)."""

  def __call__(self, t: float, window: Window, current: Placement):
    prob = self.problem(window, t)
    if prob is None:
      return None, 0.0
    cand = registry.place("prism", prob, context=self.planned.context)
    counts, _, _ = window.totals(t - self.cfg.stats_window_s, t)
    rate = counts / self.cfg.stats_window_s
    interval = self.cfg.paper_replan_s
    cur_c, new_c = (comm_seconds(self.planned, rate, x, interval) for x in (current, cand))
    mv = self.move(current, cand)
    self.log.append(f"t={t:.0f}s comm {cur_c:.1f}s -> {new_c:.1f}s + move {mv.seconds:.1f}s "
                    f"({mv.moves} copies)")
    if mv.moves == 0 or new_c + mv.seconds >= cur_c:
      return None, 0.0
    return _tagged(cand, mv.moves, "paper: prism re-plan"), mv.seconds


class OursPolicy(_Policy):
  """``ours``: the repository's incremental plan and prefix trigger (module docstring)."""

  def __call__(self, t: float, window: Window, current: Placement):
    prob = self.problem(window, t)
    halves = [self.problem(window, t, parity) for parity in (0, 1)]
    if prob is None or any(h is None for h in halves):
      return None, 0.0
    _, _, steps = window.totals(t - self.cfg.stats_window_s, t)
    steps_per_interval = self.cfg.paper_replan_s * steps / self.cfg.stats_window_s
    mix = None
    if self.cfg.ours_scoring == "serving":
      mix = StepMix.from_totals(*window.mix(t - self.cfg.stats_window_s, t))
    score = trigger_score(self.cfg.ours_scoring, mix)
    def plan(p):
      return plan_incremental(p, current, self.cfg.ours_max_moves)
    whole = plan(prob)
    savings = cross_validated_savings(halves[0], halves[1], current, plan, score)
    choice = choose_prefix(prob, current, whole, steps_per_interval, savings,
                           safety=self.cfg.ours_safety,
                           interference=self.cfg.ours_interference, score=score)
    self.log.append(f"t={t:.0f}s {choice.decision.reason}")
    if not choice.migrate:
      return None, 0.0
    cand = plan_prefix(prob, current, whole, choice.moves)
    mv = self.move(current, cand, move_sequence(cand))
    return _tagged(cand, mv.moves, "ours: incremental + trigger"), mv.seconds


def bins(result: SimResult, policy: str, bin_s: float, end_s: float) -> list[dict]:
  """Mean latency of the requests arriving in each bin of ``bin_s`` seconds."""
  arr = np.array([r.arrival_s for r in result.requests])
  lat = result.latencies()
  mig = np.array([m.time_s for m in result.migrations])
  rows = []
  for b in range(int(math.ceil(end_s / bin_s))):
    t0, t1 = b * bin_s, (b + 1) * bin_s
    sel = (arr >= t0) & (arr < t1)
    rows.append(dict(policy=policy, bin_start_s=t0, requests=int(sel.sum()),
                     mean_latency_s=float(lat[sel].mean()) if sel.any() else math.nan,
                     p99_latency_s=float(np.percentile(lat[sel], 99)) if sel.any() else math.nan,
                     migrations=int(((mig >= t0) & (mig < t1)).sum())))
  return rows


@dataclasses.dataclass(frozen=True)
class ShiftResult:
  rows: list          # SHIFT_COLUMNS per policy and bin
  after: dict         # policy -> mean latency of requests arriving after the shift
  before: dict        # policy -> mean latency of requests arriving before it
  migrations: dict    # policy -> [(time_s, copies, stall_s)]
  decisions: dict     # policy -> the controller's log lines


def run_shift(cfg: PaperConfig, seed: int | None = None,
              log: Callable[[str], None] = print) -> ShiftResult:
  """Serve the shift workload under every policy of ``cfg.shift_policies``."""
  seed = cfg.seed if seed is None else seed
  planned = plan_setting(cfg, cfg.shift_model, cfg.shift_from, seed)
  s = planned.setting
  initial = registry.place(cfg.shift_method, planned.problem, context=planned.context)
  requests = shift_requests(cfg, s.cluster.num_servers, seed)
  rows, after, before, migs, decisions = [], {}, {}, {}, {}
  for policy in cfg.shift_policies:
    ctl, every = None, math.inf
    if policy == "paper":
      ctl, every = PaperPolicy(cfg, planned), cfg.paper_replan_s
    elif policy == "ours":
      ctl, every = OursPolicy(cfg, planned), cfg.ours_check_s
    res = serve(cfg, s, planned.cost, initial, requests, seed, controller=ctl,
                check_every_s=every, bin_s=cfg.stats_window_s / 10)
    rows += bins(res, policy, cfg.shift_bin_s, cfg.shift_duration_s)
    arr = np.array([r.arrival_s for r in res.requests])
    lat = res.latencies()
    after[policy] = float(lat[arr >= cfg.shift_at_s].mean())
    before[policy] = float(lat[arr < cfg.shift_at_s].mean())
    migs[policy] = [(m.time_s, m.copies, m.stall_s) for m in res.migrations]
    decisions[policy] = list(ctl.log) if ctl is not None else []
    log(f"  shift, policy {policy}: after the shift {after[policy]:.2f} s, "
        f"{len(res.migrations)} migrations")
  return ShiftResult(rows, after, before, migs, decisions)
