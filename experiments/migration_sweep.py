r"""The migration goal over seeds, drifts and move budgets, in this process.

Every combination of ``seeds`` x ``drift_presets`` x ``budgets`` (``copies:horizon``) x
``prefix_steps`` runs the migration experiment (``experiments/migration.py``'s library call,
:func:`moe_edge.experiments.migration_run.run_migration`) with the base settings ``run``; with
``keep_runs`` each run's ``intervals.csv`` and ``summary.json`` go to ``--out/runs/<name>/``.
Writes ``shifts.csv``, ``runs.csv`` and ``summary.md`` (:mod:`moe_edge.experiments.
migration_sweep`).

Settings: ``configs/experiments/migration_sweep.py``, overridden with ``--config.KEY=VALUE``::

  python experiments/migration_sweep.py                 # 72 runs, about 25 minutes on 2 cores
  python experiments/migration_sweep.py --config.seeds=0 --config.budgets=96:1 \
      --config.drift_presets=mix --config.run.steps=48
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from absl import flags

import _cli
from moe_edge.experiments import migration_report as report
from moe_edge.experiments import migration_sweep as sweep
from moe_edge.experiments.migration_run import MigrationRun
from moe_edge.experiments.tables import write_csv

CONFIG = _cli.define_config("migration_sweep")
OUT = flags.DEFINE_string("out", "results/migration/sweep", "Output folder.")


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  cfg = CONFIG.value
  base = _cli.build(MigrationRun.from_flat, cfg.run.to_dict())
  todo = _cli.build(sweep.settings, cfg.seeds, cfg.drift_presets, cfg.budgets,
                    cfg.prefix_steps)
  for s in todo:  # every setting is valid before the first run starts
    _cli.build(s.apply, base)
  t0 = time.perf_counter()
  out = Path(OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  print(f"{len(todo)} runs of the migration experiment")

  def done(s, result):
    print(f"  {s.name}: goals {'met' if result.summary['goals_met'] else 'NOT met'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if cfg.keep_runs:
      report.write_outputs(result, out / "runs" / s.name, with_plot=False)

  summaries = sweep.run_sweep(base, todo, done)
  shift_rows, run_rows = sweep.collect(todo, summaries)
  write_csv(shift_rows, out / "shifts.csv")
  write_csv(run_rows, out / "runs.csv")
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  md = sweep.summary_markdown(command, base, cfg.seeds, shift_rows, run_rows)
  (out / "summary.md").write_text(md)
  print(md)
  print(f"wrote {out / 'shifts.csv'}, {out / 'runs.csv'}, {out / 'summary.md'} "
        f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)
