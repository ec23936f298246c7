r"""The migration goal over seeds, drifts and move budgets: runs ``experiments/migration.py``.

Every combination of ``--seeds`` x ``--drift_presets`` x ``--budgets`` (``copies:horizon``) x
``--prefix_steps`` runs ``experiments/migration.py`` in its own process (``--jobs`` at once),
its outputs in ``--out/runs/<name>/`` (kept with ``--keep_runs``, else in a temporary folder).
From the runs' ``summary.json`` it writes

* ``shifts.csv``: one row per run and shift: intervals to recover (coverage >= 95% of the full
  re-plan's), the incremental policy's copies and their share of the re-plan's, the lower bound
  on the copies any plan needs (and its share), whether the goal was met and whether the bound
  allows it;
* ``runs.csv``: one row per run: mean coverage and step latency of the three policies, copies
  moved over the whole run;
* ``summary.md``: per drift, shift and policy setting, the goal met in how many seeds, the
  median share of the re-plan's copies and the median lower-bound share, next to the per-run
  means.

  python experiments/migration_sweep.py              # about 9 minutes on two CPU cores
  python experiments/migration_sweep.py --seeds 0 --budgets 96:1 --drift_presets mix
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the sampled traces (and placements).")
flags.DEFINE_list("drift_presets", ["pairs", "mix", "all"], "experiments/migration.py "
                  "--drift_preset values.")
flags.DEFINE_list("budgets", ["64:1", "96:1", "128:1", "192:2"], "Incremental policy settings "
                  "'copies per interval:horizon'.")
flags.DEFINE_list("prefix_steps", ["0", "16"], "experiments/migration.py --prefix_step values "
                  "(0 = the trigger judges the whole campaign, all or nothing).")
flags.DEFINE_string("model", "olmoe_1b_7b", "Model (and routing statistics).")
flags.DEFINE_integer("jobs", 2, "Runs at once.")
flags.DEFINE_list("extra", [], "Further flags for every run, e.g. --extra=--alpha=0.7.")
flags.DEFINE_string("out", "results/migration/sweep", "Output folder.")
flags.DEFINE_bool("keep_runs", False, "Keep every run's outputs in --out/runs/.")

SCRIPT = Path(__file__).with_name("migration.py")


def settings() -> list[dict]:
  out = []
  for seed, drift, budget, prefix in itertools.product(FLAGS.seeds, FLAGS.drift_presets,
                                                       FLAGS.budgets, FLAGS.prefix_steps):
    copies, sep, horizon = budget.partition(":")
    if not sep or not copies.isdigit() or not horizon.isdigit() or int(horizon) < 1:
      raise app.UsageError(f"--budgets entry {budget!r} is not 'copies:horizon' (e.g. 96:1).")
    out.append(dict(seed=int(seed), drift=drift, max_moves=int(copies), horizon=int(horizon),
                    prefix_step=int(prefix)))
  return out


def run_name(s: dict) -> str:
  return (f"{s['drift']}_b{s['max_moves']}h{s['horizon']}_p{s['prefix_step']}"
          f"_s{s['seed']}")


def policy_name(s: dict) -> str:
  trig = "prefix" if s["prefix_step"] > 0 else "all-or-nothing"
  return f"{s['max_moves']} x {s['horizon']}, {trig}"


def run_one(s: dict, runs: Path) -> dict:
  d = runs / run_name(s)
  cmd = [sys.executable, str(SCRIPT), f"--model={FLAGS.model}", f"--seed={s['seed']}",
         f"--drift_preset={s['drift']}", f"--max_moves={s['max_moves']}",
         f"--horizon={s['horizon']}", f"--prefix_step={s['prefix_step']}", f"--out={d}",
         *FLAGS.extra]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"run failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
  (d / "stdout.txt").write_text(proc.stdout)
  return json.loads((d / "summary.json").read_text())


def _median(xs):
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  todo = settings()
  print(f"{len(todo)} runs of {SCRIPT.name}, {FLAGS.jobs} at once")
  with contextlib.ExitStack() as stack:
    runs = (out / "runs" if FLAGS.keep_runs
            else Path(stack.enter_context(tempfile.TemporaryDirectory())))
    with ThreadPoolExecutor(max(1, FLAGS.jobs)) as pool:
      summaries = list(pool.map(lambda s: run_one(s, runs), todo))

  shift_rows, run_rows = [], []
  for s, summ in zip(todo, summaries):
    pol = summ["policies"]
    run_rows.append(dict(s, policy=policy_name(s), **{
        f"{p}_{k}": pol[p][k] for p in ("none", "full", "incremental")
        for k in ("mean_coverage", "mean_latency_ms", "total_moves")},
        total_move_share=summ["total_move_share"]))
    for i, r in enumerate(summ["recovery"]):
      shift_rows.append(dict(s, policy=policy_name(s), shift=i + 1, step=r["step"],
                             intervals_to_recover=r["intervals_to_recover"], incremental_moves=r["incremental_moves"],
                             full_replan_moves=r["full_replan_moves"],
                             move_share=r["move_share"],
                             min_copies_any_plan=r["min_copies_any_plan"],
                             min_share_any_plan=r["min_share_any_plan"],
                             goal_feasible=r["goal_feasible"], goal_met=r["goal_met"]))
  for name, rows in (("shifts.csv", shift_rows), ("runs.csv", run_rows)):
    with open(out / name, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)

  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  md = ["# Migration goal over seeds, drifts and budgets", "",
        f"Made by `{command}` ({len(todo)} runs of `experiments/migration.py`, model "
        f"{FLAGS.model}, seeds {', '.join(FLAGS.seeds)}). Goal per shift (migration.py's "
        "defaults): coverage >= 95% of the full re-plan's within 2 intervals with <= 25% of "
        "the copies of the re-plan that follows the shift. *met*: seeds meeting it; *feasible*: seeds where the lower bound "
        "on the copies any plan needs allows it; shares are medians over the seeds "
        "(recovery: median intervals, `-` = not by the run's end).", "",
        "| drift | shift | policy (copies x horizon, trigger) | met | feasible | recovery "
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
  md += ["", "Whole runs (means over seeds):", "",
         "| drift | policy | mean coverage: incremental / re-plan / none | mean step latency "
         "(ms): incremental / re-plan / none | copies: incremental / re-plan |",
         "|---|---|---|---|---|"]
  rgroups: dict[tuple, list[dict]] = {}
  for r in run_rows:
    rgroups.setdefault((r["drift"], r["policy"]), []).append(r)
  for (drift, policy), rows in rgroups.items():
    m = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    md.append(f"| {drift} | {policy} | {m('incremental_mean_coverage'):.3f} / "
              f"{m('full_mean_coverage'):.3f} / {m('none_mean_coverage'):.3f} | "
              f"{m('incremental_mean_latency_ms'):.1f} / {m('full_mean_latency_ms'):.1f} / "
              f"{m('none_mean_latency_ms'):.1f} | {m('incremental_total_moves'):.0f} / "
              f"{m('full_total_moves'):.0f} |")
  (out / "summary.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))
  print(f"\nwrote {out / 'shifts.csv'}, {out / 'runs.csv'}, {out / 'summary.md'} "
        f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
