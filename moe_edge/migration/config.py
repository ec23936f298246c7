"""Every setting of a migration replay, typed, frozen and validated (:class:`MigrationConfig`).

One set of policy names everywhere (:data:`POLICIES`):

* ``none``: the initial DanceMoE placement (planned on the first interval) forever;
* ``full_replan``: DanceMoE from scratch every interval (the upper reference, many copies);
* ``incremental``: :func:`moe_edge.migration.incremental.plan_incremental` within a copy budget,
  gated by the cost-benefit trigger (:mod:`moe_edge.migration.trigger`) unless ``trigger`` is off.
"""
from __future__ import annotations

import dataclasses
import math

from moe_edge.config import ConfigError
from moe_edge.workload.online_stats import KINDS as STATS_KINDS

POLICIES = ("none", "full_replan", "incremental")


@dataclasses.dataclass(frozen=True)
class MigrationConfig:
  """How a replay plans and triggers migrations.

  Attributes:
    interval: trace steps per interval (the statistics window ``W``).
    policies: which of :data:`POLICIES` to run, in this order.
    seed: seed of the placement method (DanceMoE).
    lam: load-balance weight of the placement objective (DanceMoE and the incremental planner).
    max_moves: incremental policy: most expert copies per interval.
    max_mb: incremental policy: most MB copied per interval (None = no byte budget).
    trigger: judge every incremental plan with the cost-benefit trigger; off = apply the plan
      of every interval (at most ``max_moves`` copies, no campaign).
    horizon: a migration the trigger approves is a campaign of up to this many intervals of
      ``max_moves`` copies each (judged as a whole, re-planned on fresh statistics each interval).
    prefix_step: the trigger judges every prefix of this many copies of the campaign's plan and
      makes the one with the largest net gain (0 = the whole plan only: all or nothing).
    serving_steps_per_interval: serving steps an interval stands for (the trigger weighs the
      saving over these against the transfer time).
    safety: migrate when gain > safety x move cost.
    interference: fraction of serving time lost while copying.
    cross_validate: trigger on the held-out (two-fold) saving estimate instead of scoring the
      plan on the window it was fitted to.
    stats_kind: online statistics to plan on (``window`` or ``ema``).
    ema_decay: EMA decay per trace step (for ``stats_kind="ema"``).
    max_concurrent_per_link: weight copies a link carries at once.
  """
  interval: int = 8
  policies: tuple[str, ...] = POLICIES
  seed: int = 0
  lam: float = 1.0
  max_moves: int = 192
  max_mb: float | None = None
  trigger: bool = True
  horizon: int = 2
  prefix_step: int = 16
  serving_steps_per_interval: float = 2000.0
  safety: float = 2.0
  interference: float = 1.0
  cross_validate: bool = True
  stats_kind: str = "window"
  ema_decay: float = 0.9
  max_concurrent_per_link: int = 1

  def __post_init__(self):
    if isinstance(self.policies, str) or not isinstance(self.policies, (tuple, list)):
      raise ConfigError(f"migration policies must be a tuple of names from {POLICIES}, got "
                        f"{self.policies!r}.")
    object.__setattr__(self, "policies", tuple(self.policies))
    bad = [p for p in self.policies if p not in POLICIES]
    if bad or not self.policies or len(set(self.policies)) != len(self.policies):
      raise ConfigError(f"migration policies {list(self.policies)}: use distinct names from "
                        f"{POLICIES}.")
    for key in ("interval", "horizon", "max_concurrent_per_link"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
        raise ConfigError(f"migration {key} must be an integer >= 1, got "
                          f"{getattr(self, key)!r}.")
    for key in ("max_moves", "prefix_step", "seed"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 0):
        raise ConfigError(f"migration {key} must be an integer >= 0, got "
                          f"{getattr(self, key)!r}.")
    if self.max_mb is not None and not self.max_mb >= 0:
      raise ConfigError(f"migration max_mb must be >= 0 (or None: no byte budget), got "
                        f"{self.max_mb!r}.")
    for key in ("lam", "safety", "interference"):
      v = getattr(self, key)
      if not (v >= 0 and math.isfinite(v)):
        raise ConfigError(f"migration {key} must be finite and >= 0, got {v!r}.")
    if not self.serving_steps_per_interval > 0:
      raise ConfigError(f"migration serving_steps_per_interval must be > 0, got "
                        f"{self.serving_steps_per_interval!r}.")
    if self.stats_kind not in STATS_KINDS:
      raise ConfigError(f"migration stats_kind must be one of {STATS_KINDS}, got "
                        f"{self.stats_kind!r}.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(f"migration ema_decay must lie in [0, 1), got {self.ema_decay!r}.")
    if self.cross_validate and self.trigger and self.interval < 2:
      raise ConfigError("migration cross_validate needs interval >= 2 (two halves of the "
                        "window); set cross_validate=False or a longer interval.")

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))
