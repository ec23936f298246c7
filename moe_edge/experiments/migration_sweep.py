r"""The migration goal over seeds, drifts and move budgets (behind
``experiments/migration_sweep.py``).

Every combination of seeds x drift presets x budgets (``copies:horizon``) x prefix steps runs
the migration experiment in this process (:func:`moe_edge.experiments.migration_run.
run_migration` on a copy of the base :class:`~moe_edge.experiments.migration_run.MigrationRun`)
and collects

* ``shifts.csv``: one row per run and shift: intervals to recover (coverage >= 95% of the full
  re-plan's), the incremental policy's copies and their share of the re-plan's, the lower bound
  on the copies any plan needs (and its share), whether the goal was met and whether the bound
  allows it;
* ``runs.csv``: one row per run: mean coverage and step latency of the three policies, copies
  moved over the whole run;
* ``summary.md``: per drift, shift and policy setting, the goal met in how many seeds, the
  median share of the re-plan's copies and the median lower-bound share, next to the per-run
  means.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np

from moe_edge.config import ConfigError
from moe_edge.experiments.migration_run import MigrationResult, MigrationRun, run_migration
from moe_edge.migration.config import POLICIES


@dataclasses.dataclass(frozen=True)
class SweepSetting:
  """One run of the sweep."""
  seed: int
  drift: str
  max_moves: int
  horizon: int
  prefix_step: int

  @property
  def name(self) -> str:
    return f"{self.drift}_b{self.max_moves}h{self.horizon}_p{self.prefix_step}_s{self.seed}"

  @property
  def policy(self) -> str:
    trig = "prefix" if self.prefix_step > 0 else "all-or-nothing"
    return f"{self.max_moves} x {self.horizon}, {trig}"

  def apply(self, base: MigrationRun) -> MigrationRun:
    return base.replace(seed=self.seed, drift_preset=self.drift, max_moves=self.max_moves,
                        horizon=self.horizon, prefix_step=self.prefix_step)


def settings(seeds: Sequence[int], drifts: Sequence[str], budgets: Sequence[str],
             prefix_steps: Sequence[int]) -> list[SweepSetting]:
  """The product of the sweep's axes; a budget is ``'copies:horizon'`` (e.g. ``96:1``)."""
  out = []
  for seed, drift, budget, prefix in itertools.product(seeds, drifts, budgets, prefix_steps):
    copies, sep, horizon = str(budget).partition(":")
    if not sep or not copies.isdigit() or not horizon.isdigit() or int(horizon) < 1:
      raise ConfigError(f"budgets entry {budget!r} is not 'copies:horizon' (e.g. 96:1).")
    out.append(SweepSetting(int(seed), str(drift), int(copies), int(horizon), int(prefix)))
  if not out:
    raise ConfigError("the sweep is empty: seeds, drift_presets, budgets and prefix_steps each "
                      "need at least one value.")
  return out


def run_sweep(base: MigrationRun, todo: Sequence[SweepSetting],
              done: Callable[[SweepSetting, MigrationResult], None] | None = None
              ) -> list[dict]:
  """Each setting's ``summary.json`` dict, in order; ``done`` is called after every run."""
  out = []
  for s in todo:
    result = run_migration(s.apply(base))
    if done is not None:
      done(s, result)
    out.append(result.summary)
  return out


def collect(todo: Sequence[SweepSetting], summaries: Sequence[dict]) -> tuple[list, list]:
  """``(shift rows, run rows)`` of ``shifts.csv`` and ``runs.csv``."""
  shift_rows, run_rows = [], []
  for s, summ in zip(todo, summaries):
    key = dict(seed=s.seed, drift=s.drift, max_moves=s.max_moves, horizon=s.horizon,
               prefix_step=s.prefix_step, policy=s.policy)
    pol = summ["policies"]
    run_rows.append(dict(key, **{f"{p}_{k}": pol[p][k] for p in POLICIES
                                 for k in ("mean_coverage", "mean_latency_ms", "total_moves")},
                         total_move_share=summ["total_move_share"]))
    for i, r in enumerate(summ["recovery"]):
      shift_rows.append(dict(key, shift=i + 1, **{k: r[k] for k in (
          "step", "intervals_to_recover", "incremental_moves", "full_replan_moves", "move_share",
          "min_copies_any_plan", "min_share_any_plan", "goal_feasible", "goal_met")}))
  return shift_rows, run_rows


def _median(xs):
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


def _shift_table(shift_rows: list[dict]) -> list[str]:
  md = ["| drift | shift | policy (copies x horizon, trigger) | met | feasible | recovery "
        "(intervals) | copies / re-plan's | lower bound / re-plan's |",
        "|---|---|---|---|---|---|---|---|"]
  groups: dict[tuple, list[dict]] = {}
  for r in shift_rows:
    groups.setdefault((r["drift"], r["shift"], r["policy"]), []).append(r)
  for (drift, shift, policy), rows in groups.items():
    rec = [r["intervals_to_recover"] for r in rows]
    med_rec = "-" if any(x is None for x in rec) and sum(x is None for x in rec) * 2 >= len(
        rec) else f"{np.median([x if x is not None else 99 for x in rec]):g}"
    md.append(f"| {drift} | {shift} | {policy} | {sum(r['goal_met'] for r in rows)}/{len(rows)}"
              f" | {sum(r['goal_feasible'] for r in rows)}/{len(rows)} | {med_rec} | "
              f"{_pct(_median([r['move_share'] for r in rows]))} | "
              f"{_pct(_median([r['min_share_any_plan'] for r in rows]))} |")
  return md


def _run_table(run_rows: list[dict]) -> list[str]:
  md = ["| drift | policy | mean coverage: incremental / re-plan / none | mean step latency "
        "(ms): incremental / re-plan / none | copies: incremental / re-plan |",
        "|---|---|---|---|---|"]
  groups: dict[tuple, list[dict]] = {}
  for r in run_rows:
    groups.setdefault((r["drift"], r["policy"]), []).append(r)
  for (drift, policy), rows in groups.items():
    m = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    md.append(f"| {drift} | {policy} | {m('incremental_mean_coverage'):.3f} / "
              f"{m('full_replan_mean_coverage'):.3f} / {m('none_mean_coverage'):.3f} | "
              f"{m('incremental_mean_latency_ms'):.1f} / {m('full_replan_mean_latency_ms'):.1f} "
              f"/ {m('none_mean_latency_ms'):.1f} | {m('incremental_total_moves'):.0f} / "
              f"{m('full_replan_total_moves'):.0f} |")
  return md


def summary_markdown(command: str, base: MigrationRun, seeds: Sequence[int],
                     shift_rows: list[dict], run_rows: list[dict]) -> str:
  """``summary.md``: the goal per drift, shift and setting, and the whole-run means."""
  md = ["# Migration goal over seeds, drifts and budgets", "",
        f"Made by `{command}` ({len(run_rows)} runs of the migration experiment, model "
        f"{base.model}, seeds {', '.join(str(s) for s in seeds)}). Goal per shift: coverage >= "
        f"{base.coverage_target:.0%} of the full re-plan's within {base.recovery_intervals} "
        f"intervals with <= {base.move_fraction:.0%} of the copies of the re-plan that follows "
        "the shift. *met*: seeds meeting it; *feasible*: seeds where the lower bound "
        "on the copies any plan needs allows it; shares are medians over the seeds "
        "(recovery: median intervals, `-` = not by the run's end).", ""]
  md += _shift_table(shift_rows)
  md += ["", "Whole runs (means over seeds):", ""]
  md += _run_table(run_rows)
  return "\n".join(md) + "\n"
