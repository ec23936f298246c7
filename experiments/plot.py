"""Redraw the figures of the tables and the ablations from their CSVs (no recomputation).

  python experiments/plot.py --tables results/tables --ablations results/ablations

Tables: ``decode_latency.png``, ``prefill_latency.png``, ``cross_bytes.png`` from
``tables.csv``. Ablations: ``<sweep>.png`` from every ``<sweep>.csv`` found. The figures are
files of the run that made the folder (``reproduce_tables.py`` / ``ablations.py``, recorded in
its ``manifest.json``): this script redraws them in place, each written atomically, and leaves
that run's manifest as it is (it claims no folder of its own). A missing folder or CSV is one
``plot.py: error: ...`` line.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from moe_edge.io import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("tables", "results/tables", "Folder with tables.csv ('' to skip).")
flags.DEFINE_string("ablations", "results/ablations", "Folder with the sweep CSVs ('' to skip).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from moe_edge.experiments import plots
  from moe_edge.experiments.config import SWEEPS
  from moe_edge.experiments.sweeps import X_LABELS
  from moe_edge.experiments.tables import read_rows
  made = []
  if FLAGS.tables:
    path = Path(FLAGS.tables) / "tables.csv"
    if not path.is_file():
      raise app.UsageError(f"no {path}; run experiments/reproduce_tables.py first.")
    made += plots.plot_tables(read_rows(path), Path(FLAGS.tables))
  if FLAGS.ablations:
    folder = Path(FLAGS.ablations)
    found = [s for s in SWEEPS if (folder / f"{s}.csv").is_file()]
    if not found:
      raise app.UsageError(f"no sweep CSVs in {folder}; run experiments/ablations.py first.")
    for name in found:
      rows = read_rows(folder / f"{name}.csv")
      if name == "parts":
        made.append(plots.plot_parts(rows, folder / f"{name}.png"))
      elif name == "migration":
        shifts = [int(s) for s in str(rows[0]["drift_after"]).split(";") if s]
        made.append(plots.plot_migration(rows, shifts, folder / f"{name}.png"))
      else:
        made.append(plots.plot_sweep(rows, name, folder / f"{name}.png", X_LABELS[name],
                                     log_x=name == "link_bandwidth"))
  for p in made:
    print(f"wrote {p}")


if __name__ == "__main__":
  cli.run(main)
