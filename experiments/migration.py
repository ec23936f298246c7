r"""Runtime migration under workload drift: no migration vs full re-plan vs incremental.

Replays a drifting workload in intervals (``interval`` trace steps). By default the trace is
sampled from the real per-domain routing counts of OLMoE-1B-7B (``source="stats"``): server
``i`` serves mostly domain ``i`` (share ``alpha``) and the servers' home domains change as
``drift_preset`` says (``pairs``: servers 0 and 1 swap after the first third, servers 2 and 3
after the second; ``mix``: the same pairs instead both serve an even mix of their two homes;
``all``: every neighbour pair, then a rotation of all homes; or ``drift``). ``source=PATH``
replays a recorded trace instead (e.g. real text through the Flax model,
``experiments/collect_traces.py --drift ...``; its drift steps are read from its metadata).

The policies ``none``, ``full_replan`` and ``incremental`` (campaigns judged by the prefix
trigger) are those of the one replay pipeline, :mod:`moe_edge.migration.replay`; the costing,
the recovery goal and the failure drill are :mod:`moe_edge.experiments.migration_run`. Writes
``intervals.csv``, ``summary.json`` and ``migration.png`` into ``--out``.

Settings: ``configs/experiments/migration.py``, overridden with ``--config.KEY=VALUE``.
Example (about 40 s on two CPU cores)::

  python experiments/migration.py --config.fail_server=3 --config.fail_step=40
  python experiments/migration.py --config.drift_preset=mix --config.max_moves=96

``experiments/migration_sweep.py`` runs it over seeds, drifts and budgets.
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import flags

import _cli
from moe_edge.experiments import migration_report as report
from moe_edge.experiments.migration_run import MigrationRun, run_migration

CONFIG = _cli.define_config("migration")
OUT = flags.DEFINE_string("out", "results/migration", "Output folder.")


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  run = _cli.build(MigrationRun.from_flat, CONFIG.value.to_dict())
  t0 = time.time()
  result = run_migration(run, log=print)
  paths = report.write_outputs(result, Path(OUT.value))
  policies = run.migration.policies
  print("\n" + report.format_intervals(result.rows, policies, run.migration.interval))
  print("\n" + report.format_totals(result.summary))
  print("\n" + report.format_recovery(run, result.summary))
  if run.fail_server >= 0:
    print("\n" + report.format_failure(run, result))
  print(f"\nwrote {', '.join(str(p) for p in paths)} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)
