"""Printing and files of the migration experiment (:mod:`moe_edge.experiments.migration_run`):
``intervals.csv``, ``summary.json``, ``migration.png`` and the console tables."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np

from moe_edge.experiments.migration_run import MigrationResult, MigrationRun, series

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"none": ("tab:gray", "--"), "full_replan": ("tab:blue", "-"),
         "incremental": ("tab:red", "-")}


def format_intervals(rows: list[dict], policies: tuple[str, ...], interval: int) -> str:
  """Per interval and policy: coverage, step latency, copies and GB moved."""
  lines = [f"{'interval':>8} {'step':>5} | " + " | ".join(f"{p:^27}" for p in policies),
           f"{'':>8} {'':>5} | " + " | ".join(f"{'cov':>6} {'lat ms':>8} {'moves':>5} {'GB':>5}"
                                               for _ in policies)]
  for i in range(len(series(rows, policies[0], "coverage"))):
    r = {x["policy"]: x for x in rows if x["interval"] == i}
    lines.append(f"{i:>8} {i * interval:>5} | " + " | ".join(
        f"{r[p]['coverage']:>6.3f} {r[p]['latency_ms']:>8.2f} {r[p]['moves']:>5d} "
        f"{r[p]['mb_moved'] / 1e3:>5.2f}" for p in policies))
  return "\n".join(lines)


def format_totals(summary: dict) -> str:
  lines = ["Totals over the run:"]
  for p, s in summary["policies"].items():
    lines.append(f"  {p:>11}: mean coverage {s['mean_coverage']:.3f}, mean step latency "
                 f"{s['mean_latency_ms']:.2f} ms, {s['total_moves']} expert copies = "
                 f"{s['total_gb']:.2f} GB of weights moved ({s['total_transfer_s']:.1f} s of "
                 f"transfers)")
  return "\n".join(lines)


def _format_shift(run: MigrationRun, r: dict) -> list[str]:
  t, need = r["intervals_to_recover"], r["min_copies_any_plan"]
  share = "n/a" if r["move_share"] is None else f"{r['move_share']:.0%}"
  lines = [
      f"  shift at step {r['step']}: recovered after {'never' if t is None else t} interval(s) "
      f"(coverage ratio {r['ratio_at_recovery'] or float('nan'):.3f}) with "
      f"{r['incremental_moves']} copies vs {r['full_replan_moves']} of the re-plan after the "
      f"shift ({share}; the re-plan policy made {r['full_policy_moves_same_intervals']} over "
      f"the same intervals) -> {'met' if r['goal_met'] else 'NOT met'}"
      + ("" if r["goal_met"] or r["goal_feasible"] else " (no plan can meet it: see the lower "
         "bound)"),
      f"    lower bound: any plan needs >= {need if need is not None else 'n/a'} copies to "
      f"recover within {run.recovery_intervals} intervals"
      + (f" ({r['min_share_any_plan']:.0%} of the re-plan's)"
         if r["min_share_any_plan"] is not None else "")
      + (f"; from the re-plan policy's placement before the shift >= "
         f"{r['min_copies_from_replan_state']} "
         f"({r['min_copies_from_replan_state'] / max(r['full_replan_moves'], 1):.0%})"
         if r["min_copies_from_replan_state"] is not None else "")]
  tl = r["intervals_to_recover_latency"]
  lines.append(f"    step latency within {1 / run.coverage_target - 1:.0%} of the re-plan's after "
               + ("never" if tl is None else f"{tl} interval(s), {r['moves_to_recover_latency']} "
                  f"copies ({r['moves_to_recover_latency'] / max(r['full_replan_moves'], 1):.0%})"))
  return lines


def format_recovery(run: MigrationRun, summary: dict) -> str:
  """The goal per shift and over the whole run."""
  lines = [f"After each shift (goal: coverage >= {run.coverage_target:.0%} of the full "
           f"re-plan's within {run.recovery_intervals} intervals, with <= "
           f"{run.move_fraction:.0%} of its expert moves):"]
  for r in summary["recovery"]:
    lines += _format_shift(run, r)
  tot_i = summary["policies"]["incremental"]["total_moves"]
  tot_f = summary["policies"]["full_replan"]["total_moves"]
  lines.append(f"  whole run: incremental copied {tot_i} experts, full re-plan {tot_f} "
               f"({'n/a' if not tot_f else f'{tot_i / tot_f:.0%}'}); goals "
               f"{'met' if summary['goals_met'] else 'NOT met'}")
  return "\n".join(lines)


def format_failure(run: MigrationRun, result: MigrationResult) -> str:
  """The failure drill's account, or why it was skipped."""
  f = result.summary.get("failure")
  if f is None:
    return f"Failure drill skipped: fail_step {run.fail_step} is outside the trace."
  name = result.cluster.servers[f["server"]].name
  return "\n".join([
      f"Failure drill: server {f['server']} ({name}) fails in interval {f['interval']}",
      f"  replicas lost {f['lost_replicas']}; experts it held alone: {f['orphans']} "
      f"(unreachable until re-loaded); {100 * f['rerouted_share']:.1f}% of the survivors' "
      f"token-choices rerouted at once to other replicas",
      f"  re-loaded {f['reloads']} experts from storage ({f['storage_gb']:.2f} GB at "
      f"{run.storage_gbps:g} GB/s per server), evicting {f['evicted']} replicas; recovery time "
      f"{f['recovery_s']:.2f} s",
      f"  survivors' coverage {f['coverage_before']:.3f} before -> {f['coverage_after']:.3f} "
      f"after recovery; step latency {f['latency_ms_before']:.1f} -> "
      f"{f['latency_ms_after']:.1f} ms"])


def plot(rows: list[dict], policies: tuple[str, ...], shifts: list[int], interval: int,
         path: Path) -> None:
  """Coverage, step latency and copies per interval and policy; dotted lines at the shifts."""
  fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
  for p in policies:
    x = series(rows, p, "first_step")
    c, ls = STYLE[p]
    axes[0].plot(x, series(rows, p, "coverage"), color=c, ls=ls, marker="o", ms=3, label=p)
    axes[1].plot(x, series(rows, p, "latency_ms"), color=c, ls=ls, marker="o", ms=3, label=p)
    mv = series(rows, p, "moves")
    axes[2].step(np.append(x, x[-1] + interval), np.append(mv, mv[-1]), color=c, ls=ls,
                 where="post", label=p)
  for ax in axes:
    for s in shifts:
      ax.axvline(s, color="k", lw=0.8, ls=":")
  axes[0].set_ylabel("local coverage")
  axes[1].set_ylabel("step latency (ms)\n(cost model)")
  axes[2].set_ylabel("expert copies\nat interval start")
  axes[2].set_xlabel(f"trace step (interval = {interval} steps; dotted: workload shifts)")
  axes[0].legend(loc="best")
  axes[0].set_title("Migration under workload drift")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(result: MigrationResult, out: Path, with_plot: bool = True) -> list[Path]:
  """``intervals.csv``, ``summary.json`` and (``with_plot``) ``migration.png`` into ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / "intervals.csv", out / "summary.json"]
  with open(paths[0], "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(result.rows[0]))
    wr.writeheader()
    wr.writerows(result.rows)
  paths[1].write_text(json.dumps(result.summary, indent=1))
  if with_plot:
    cfg = result.replay.config
    paths.append(out / "migration.png")
    plot(result.rows, cfg.policies, result.shifts, cfg.interval, paths[-1])
  return paths
