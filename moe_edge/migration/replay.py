r"""The one replay pipeline: serve a drifting trace interval by interval under each policy.

A trace is cut into intervals of ``cfg.interval`` trace steps. Every policy of
:data:`~moe_edge.migration.config.POLICIES` serves every interval with its current placement and,
after it, plans for the next interval from what the online statistics
(:class:`~moe_edge.workload.online_stats.OnlineStats`, ``cfg.stats_kind``) saw:

* ``none`` keeps the DanceMoE placement planned on interval 0;
* ``full_replan`` re-runs DanceMoE from scratch (:func:`~moe_edge.migration.incremental.
  full_replan`), its copies scheduled by :func:`~moe_edge.migration.schedule.move_cost`;
* ``incremental`` plans :func:`~moe_edge.migration.incremental.plan_incremental`. With
  ``cfg.trigger`` the trigger (:func:`~moe_edge.migration.trigger.choose_prefix`, fed with the
  held-out savings of :func:`~moe_edge.migration.trigger.cross_validated_savings` when
  ``cfg.cross_validate``) judges a *campaign* of up to ``cfg.horizon`` intervals: every prefix of
  its ``horizon x max_moves`` best-first copies (``k`` in steps of ``cfg.prefix_step``) against
  the saving over the horizon; the approved prefix with the largest net gain is made, at most
  ``max_moves`` copies per interval, re-planned on fresh statistics every interval. Without the
  trigger every interval's plan (at most ``max_moves`` copies) is applied.

Planning problems carry each server's tokens *per trace step* (the interval's tokens divided
by its steps). :func:`replay` only plans: it returns every policy's state per interval
(:class:`Replay`), and the caller costs them as it likes (``experiments/migration.py`` with the
cost model on each interval's tokens, the ablations with the tables' decode and prefill phases).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.migration.config import MigrationConfig
from moe_edge.migration.incremental import full_replan, objective_value, plan_incremental
from moe_edge.migration.schedule import hosted_at_every_moment, move_cost, move_sequence
from moe_edge.migration.slots import MigrationError, changed_experts
from moe_edge.migration.trigger import choose_prefix, cross_validated_savings, plan_prefix
from moe_edge.placement import place
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.workload.online_stats import OnlineStats
from moe_edge.workload.traces import ActivationTrace

PLANNER = "dancemoe"  # the placement method of the initial plan and of the full re-plan


@dataclasses.dataclass(frozen=True)
class PolicyState:
  """A policy's placement during one interval and the migration applied at its start.

  Attributes:
    placement: the placement serving the interval.
    moves: expert copies of the migration; changed: experts whose host set changed.
    transfer_s: the migration's scheduled transfer time (s).
    drift: mean TV distance of the statistics it was planned on to the last planned ones.
    saving_ms, gain_s, cost_s: the trigger's estimate of the step-latency saving and its gain
      and cost over the interval (incremental policy with the trigger).
    note: the trigger's reason, or what the policy did.
  """
  placement: Placement
  moves: int = 0
  changed: int = 0
  transfer_s: float = 0.0
  drift: float = 0.0
  saving_ms: float = 0.0
  gain_s: float = 0.0
  cost_s: float = 0.0
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Replay:
  """What :func:`replay` returns.

  Attributes:
    config: the settings.
    windows: ``[I]`` the intervals' traces.
    truths: ``[I]`` each interval's own statistics (frequency, tokens per step) as a problem.
    history: policy -> ``[I]`` :class:`PolicyState`, in ``config.policies`` order.
    initial: the DanceMoE placement planned on interval 0.
  """
  config: MigrationConfig
  windows: tuple[ActivationTrace, ...]
  truths: tuple[PlacementProblem, ...]
  history: dict[str, tuple[PolicyState, ...]]
  initial: Placement

  @property
  def num_intervals(self) -> int:
    return len(self.windows)

  def placements(self, policy: str) -> list[Placement]:
    return [s.placement for s in self.history[policy]]


def intervals(trace: ActivationTrace, interval: int) -> list[ActivationTrace]:
  """The trace cut into windows of ``interval`` trace steps (the last may be shorter)."""
  steps = int(trace.step.max()) + 1
  return [trace.window(i * interval, (i + 1) * interval) for i in range(-(-steps // interval))]


def step_tokens(window: ActivationTrace) -> np.ndarray:
  """``[N]`` tokens per server per trace step of ``window``."""
  return window.tokens_per_server() / max(len(np.unique(window.step)), 1)


class _Incremental:
  """The incremental policy's planning, with the state of an approved campaign."""

  def __init__(self, cfg: MigrationConfig, model: ModelConfig, cluster: ClusterConfig,
               capacity: np.ndarray):
    self.cfg, self.model, self.cluster, self.capacity = cfg, model, cluster, capacity
    self.campaign_left = 0  # copies an approved campaign may still make

  def _plan(self, prob: PlacementProblem, cur: Placement, intervals: int = 1,
            copies: int | None = None) -> Placement:
    """plan_incremental with ``intervals`` budgets (or ``copies`` copies, within one)."""
    cfg = self.cfg
    max_mb = None if cfg.max_mb is None else cfg.max_mb * 1e6
    return plan_incremental(prob, cur, cfg.max_moves * intervals if copies is None else copies,
                            None if max_mb is None else max_mb * intervals, lam=cfg.lam)

  def _judge(self, seen: PlacementProblem, halves, cur: Placement,
             drift: float) -> tuple[Placement | None, dict]:
    """The trigger on the campaign's prefixes: ``(this interval's placement or None, trigger
    fields of the state)``."""
    cfg = self.cfg
    whole = self._plan(seen, cur, cfg.horizon)
    savings = None
    if cfg.cross_validate:
      savings = cross_validated_savings(*halves(), cur,
                                        lambda prob: self._plan(prob, cur, cfg.horizon))
    choice = choose_prefix(seen, cur, whole, cfg.serving_steps_per_interval * cfg.horizon,
                           savings, cfg.prefix_step, cfg.safety, cfg.interference,
                           cfg.max_concurrent_per_link)
    dec = choice.decision
    trig = dict(drift=drift, saving_ms=1e3 * dec.saving_per_step_s, gain_s=dec.gain_s,
                cost_s=dec.cost_s, note=dec.reason)
    if not choice.migrate:
      return None, trig
    first = min(choice.moves, cfg.max_moves)
    self.campaign_left = choice.moves - first
    return plan_prefix(seen, cur, whole, first), trig  # this interval's share

  def __call__(self, seen: PlacementProblem, halves: Callable, cur: Placement,
               drift: float) -> tuple[PolicyState, bool]:
    """The next interval's state and whether a migration was made."""
    cfg = self.cfg
    if not cfg.trigger:
      cand, trig = self._plan(seen, cur), dict(drift=drift)
    elif self.campaign_left > 0:
      # An approved campaign goes on: re-planned on the fresh statistics, with what is left of
      # the copies it was approved for (at most one budget per interval).
      allowed = min(cfg.max_moves, self.campaign_left)
      cand = self._plan(seen, cur, copies=allowed)
      trig = dict(drift=drift, note=f"campaign continues ({self.campaign_left} copies approved)")
      made = len(cand.info["moves"])
      self.campaign_left = self.campaign_left - made if made == allowed else 0  # nothing gains
      cand = cand if made > 0 else None
    else:
      cand, trig = self._judge(seen, halves, cur, drift)
    if cand is None:
      return PolicyState(cur, **trig), False
    plan = move_cost(cur, cand, self.model, self.cluster, self.capacity,
                     cfg.max_concurrent_per_link, sequence=move_sequence(cand))
    if not hosted_at_every_moment(cur.hosts, plan.steps, self.capacity):
      raise MigrationError("incremental plan would leave an expert unhosted; this is a bug.")
    return PolicyState(cand, plan.moves, changed_experts(cur, cand), plan.seconds, **trig), True


def _full_replan(cfg: MigrationConfig, seen: PlacementProblem, cur: Placement, drift: float,
                 model: ModelConfig, cluster: ClusterConfig,
                 capacity: np.ndarray) -> PolicyState:
  new = full_replan(seen, cur, PLANNER, seed=cfg.seed, lam=cfg.lam)
  plan = move_cost(cur, new, model, cluster, capacity, cfg.max_concurrent_per_link)
  return PolicyState(new, plan.moves, changed_experts(cur, new), plan.seconds, drift,
                     note=f"re-plan; {plan.staged} staged copies" if plan.staged else "re-plan")


def replay(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
           capacity: np.ndarray, cfg: MigrationConfig,
           log: Callable[[str], None] | None = None) -> Replay:
  """Run ``cfg.policies`` over ``trace`` (module docstring).

  Args:
    trace: the drifting workload (``step`` = request index per server).
    model, cluster: the model and the cluster (links, servers).
    capacity: ``[N]`` experts each server holds.
    cfg: the settings.
    log: called with a line about the initial placement (e.g. ``print``).
  """
  def problem(freq, window):
    return PlacementProblem.build(model, cluster, freq, step_tokens(window), capacity)

  windows = intervals(trace, cfg.interval)
  kind = cfg.stats_kind
  stats = OnlineStats(cluster.num_servers, model.n_moe_layers, model.n_experts,
                      window=cfg.interval, decay=cfg.ema_decay)
  stats.update_steps(windows[0])
  first = problem(stats.frequency(kind), windows[0])
  t0 = time.time()
  initial = place(PLANNER, first, seed=cfg.seed, lam=cfg.lam)
  if log is not None:
    log(f"initial DanceMoE placement on interval 0: {time.time() - t0:.1f} s, objective "
        f"{objective_value(first, initial, cfg.lam):.4f}")
  stats.mark_planned(kind=kind)
  state = {p: PolicyState(initial) for p in cfg.policies}
  incremental = _Incremental(cfg, model, cluster, capacity)
  history = {p: [] for p in cfg.policies}
  truths = []
  for i, win in enumerate(windows):
    truths.append(problem(win.frequency(), win))
    for name in cfg.policies:
      history[name].append(state[name])
    if i + 1 == len(windows):
      break
    # Plan for interval i + 1 from what interval i showed.
    if i > 0:
      stats.update_steps(win)
    drift = float(stats.drift(kind).mean())
    seen = problem(stats.frequency(kind), win)
    halves = lambda win=win: tuple(problem(f, win) for f in stats.window_halves())  # noqa: E731
    for name in cfg.policies:
      cur = state[name].placement
      if name == "none":
        state[name] = PolicyState(initial)
      elif name == "full_replan":
        state[name] = _full_replan(cfg, seen, cur, drift, model, cluster, capacity)
      else:
        state[name], migrated = incremental(seen, halves, cur, drift)
        if migrated:
          stats.mark_planned(kind=kind)
  return Replay(cfg, tuple(windows), tuple(truths),
                {p: tuple(h) for p, h in history.items()}, initial)
