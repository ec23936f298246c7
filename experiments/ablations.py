"""Ablation sweeps: link bandwidth, number of servers, memory budget, locality, DanceMoE's parts
switched off one at a time, migration under a drifting workload, and the routing extensions
(substitution / drop threshold on the trained small model).

One CSV and one PNG per sweep into ``--out`` (``<sweep>.csv``, ``<sweep>.png``), plus
``summary.md`` with a Markdown pivot of every sweep (decode / prefill latency and bytes per
method). Sweeps and their defaults: ``moe_edge/experiments/sweeps.py`` and the config.

  python experiments/ablations.py --config ablations --out results/ablations
  python experiments/ablations.py --config.sweeps=link_bandwidth --config.sweeps=parts --out /tmp/abl

Settings: the preset (``--config``, a file or a name under ``configs/experiments/``) with
``--config.KEY=VALUE`` overrides of any :class:`~moe_edge.experiments.config.ExperimentConfig`
field (``sweeps``, ``sweep_models``, ``seed``, ...).
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from absl import flags, logging

import _cli
from moe_edge.experiments import plots
from moe_edge.experiments.config import build_experiment
from moe_edge.experiments.progress import Progress
from moe_edge.experiments.sweeps import (X_LABELS, format_sweep, migration_summary, run_sweep,
                                         sweep_units)
from moe_edge.experiments.tables import write_csv

CONFIG = _cli.define_config("ablations")
OUT = flags.DEFINE_string("out", "results/ablations", "Output folder.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress display on stderr.")


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines out of the progress display
  t0 = time.perf_counter()
  cfg = _cli.build(build_experiment, CONFIG.value)
  if not cfg.sweeps:
    raise SystemExit(f"config {cfg.name!r} names no sweeps; pass --config.sweeps=NAME.")
  out = Path(OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  summary = [f"# Ablations", "", f"Made by `{command}` (config `{cfg.name}`, seed {cfg.seed}; "
             f"calibration {cfg.calibration}; {cfg.copies:g} copies of expert memory and "
             f"{cfg.link_gbps:g} Gbps unless the sweep varies it; best value per row in bold).",
             ""]
  extra = {}
  with Progress(sum(sweep_units(cfg, s) for s in cfg.sweeps), "ablations",
                enabled=PROGRESS.value) as progress:
    for name in cfg.sweeps:
      t1 = time.perf_counter()
      rows = run_sweep(cfg, name, progress)
      write_csv(rows, out / f"{name}.csv")
      if name == "parts":
        plots.plot_parts(rows, out / f"{name}.png")
      elif name == "extensions":
        plots.plot_extensions(rows, out / f"{name}.png")
      elif name == "migration":
        shifts = [int(s) for s in str(rows[0]["drift_after"]).split(";") if s]
        plots.plot_migration(rows, shifts, out / f"{name}.png")
        summ = migration_summary(rows)
        extra["migration"] = summ
      else:
        plots.plot_sweep(rows, name, out / f"{name}.png", X_LABELS[name],
                         log_x=name == "link_bandwidth")
      progress.note(f"{name}: {len(rows)} rows in {time.perf_counter() - t1:.1f} s")
      summary += [f"## {name}", "", f"x: {X_LABELS[name]}. Files: {name}.csv, {name}.png.", ""]
      if name == "migration":
        summary += ["| policy | intervals | decode ms | prefill ms | coverage | kB/token | "
                    "expert copies | GB moved | transfer s |", "|" + "---|" * 9]
        summary += [f"| {s['policy']} | {s['intervals']} | {s['decode_ms']:.2f} | "
                    f"{s['prefill_ms']:.1f} | {s['coverage']:.3f} | "
                    f"{s['cross_kb_per_token']:.1f} | {s['moves']} | {s['gb_moved']:.2f} | "
                    f"{s['transfer_s']:.1f} |" for s in summ]
        summary += ["", "(means over the intervals after the first; copies, GB and transfer "
                    "time summed)", ""]
        summary.append(format_sweep(rows, name, "decode_ms"))
      elif name == "extensions":
        summary.append(format_sweep(rows, name, "cross_kb_per_token", ".3f"))
        summary.append(format_sweep(rows, name, "decode_ms"))
        summary.append(format_sweep(rows, name, "delta_nll", "+.4f"))
      else:
        summary.append(format_sweep(rows, name, "decode_ms"))
        summary.append(format_sweep(rows, name, "prefill_ms", ".1f"))
        summary.append(format_sweep(rows, name, "cross_kb_per_token", ".1f"))
  (out / "summary.md").write_text("\n".join(summary) + "\n")
  (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
  print("\n".join(summary))
  print(f"\nwrote {len(cfg.sweeps)} sweeps to {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)
