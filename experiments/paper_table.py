r"""The paper's experiment on its testbed: our table beside the paper's, request-level latency.

Models {deepseek_v2_lite, mixtral_8x7b} x workloads {specialised, multidata} x methods
(uniform_ep, redundance, smartmoe, eplb_hetero, prism, dancemoe and every registered ``ours``
method), served on the simulated 3-server testbed; the workload shift under three migration
policies; the scaling sweep. Writes ``table.csv``, ``shift.csv``, ``scaling.csv``,
``summary.json``, the latency CDF plots and ``README.md`` (our ratios next to the paper's)
into ``--out``; prints the comparison.

  python experiments/paper_table.py --config configs/experiments/paper_testbed.py
  python experiments/paper_table.py --config paper_testbed_quick --out /tmp/paper
  python experiments/paper_table.py --config paper_testbed_quick --config.duration_s=120

Parts can be run alone with ``--parts table,shift,scaling,calibrated,sweep`` (default: all;
``calibrated`` serves the placements on a testbed whose times are scaled so eplb_hetero matches
the paper's EPLB latency, ``moe_edge/experiments/paper_calibrated.py``; ``sweep`` varies the
workload's locality, prompt and output lengths one at a time there,
``moe_edge/experiments/paper_sweep.py``); with
``--reuse`` the parts not run are read back from ``--out`` (``table.csv``, ``latencies.csv``,
``shift.csv``, ``scaling.csv``, ``calibrated.csv``, ``sweep.csv``, ``summary.json``), so the README covers them all;
``--parts= --reuse`` only rewrites the README and plots from those files.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from absl import app, flags

import _cli
from moe_edge.experiments import paper_report as rep
from moe_edge.experiments.paper_calibrated import ratios, run_calibrated
from moe_edge.experiments.paper_config import paper_config
from moe_edge.experiments.paper_readme import load_parts, write_outputs
from moe_edge.experiments.paper_shift import run_shift
from moe_edge.experiments.paper_sweep import run_sweep
from moe_edge.experiments.paper_table import run_scaling, run_table
from moe_edge.io import OutputFolder, RunIdentity

CONFIG = _cli.define_config("paper_testbed")
OUT, OVERWRITE = _cli.define_output("results/paper")
#: What a run writes into --out (its README.md is generated, so it is the run's file too).
OUTPUTS = ("*.csv", "*.png", "summary.json", "README.md")
#: Each part, in run order: the line printed before it runs, and its runner.
PART_RUNNERS = {
    "table": (lambda cfg: f"table: {len(cfg.models)} models x {len(cfg.table_workloads)} "
                          f"workloads", run_table),
    "shift": (lambda cfg: "shift:", run_shift),
    "scaling": (lambda cfg: "scaling:", run_scaling),
    "calibrated": (lambda cfg: "calibrated (time scale fitted to the paper's EPLB latency):",
                   run_calibrated),
    "sweep": (lambda cfg: "sweep (one workload knob at a time, calibrated testbed):", run_sweep),
}
ALL_PARTS = tuple(PART_RUNNERS)
PARTS = flags.DEFINE_list("parts", list(ALL_PARTS),
                          f"Which parts to run: {', '.join(ALL_PARTS)}.")
REUSE = flags.DEFINE_bool("reuse", False, "Keep the parts not run from the files an earlier run "
                          "wrote into --out (the README and plots then cover every part).")


def run(cfg, out: Path, parts, command: str, reuse: bool = False) -> str:
  """Run the parts, write the outputs; returns the comparison text printed at the end."""
  t0 = time.perf_counter()
  got = {}
  commands = {p: command for p in parts}
  if reuse:
    old = load_parts(out)
    got = {p: old[p] for p in ALL_PARTS if old.get(p) is not None}
    prior = old.get("commands", {})
    if "all" in prior:
      prior = {p: prior["all"] for p in ("table", "shift", "scaling")}
    commands = {p: prior[p] for p in ALL_PARTS
                if p in prior and p not in parts and p in got} | commands
  for p, (title, runner) in PART_RUNNERS.items():
    if p in parts:
      print(title(cfg), flush=True)
      got[p] = runner(cfg, log=lambda s: print(s, flush=True))
  rows, lat, light = got.get("table", ([], {}, {}))
  shift, scaling, calibrated, sweep = (got.get(p) for p in ALL_PARTS[1:])
  paths = write_outputs(cfg, out, rows, lat, shift, scaling, commands,
                        time.perf_counter() - t0, light, calibrated, sweep)
  comps = rep.compare(rows)
  text = [rep.format_comparison(comps), "",
          rep.format_goals(rep.goals(comps, dict(shift.after) if shift else None, light,
                                     cfg.light_load_factor, ratios(calibrated)))]
  if shift:
    text += ["", rep.format_shift(shift)]
  print(f"wrote {', '.join(p.name for p in paths)} into {out} "
        f"({time.perf_counter() - t0:.0f} s)", flush=True)
  return "\n".join(text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = paper_config(CONFIG.value)
  bad = [p for p in PARTS.value if p not in ALL_PARTS]
  if not PARTS.value and not REUSE.value:
    raise app.UsageError("no parts to run; give --parts, or --reuse to rewrite the README from "
                         "--out.")
  if bad:
    raise app.UsageError(f"unknown parts {bad}; use {', '.join(ALL_PARTS)}.")
  # The run's identity is its config (not --parts): runs of single parts share one folder;
  # with --reuse the files of the parts not run are kept (they are read back).
  out = Path(OUT.value)
  keep = [p.name for p in out.iterdir() if p.is_file()] if REUSE.value and out.is_dir() else []
  folder = OutputFolder.claim(out, RunIdentity("paper_table", CONFIG.value.to_dict(), None),
                              OUTPUTS, overwrite=OVERWRITE.value, resume=REUSE.value,
                              leftovers=keep, refuse_hint="choose another --out, or pass "
                              "--overwrite to replace them")
  root = str(_cli.REPO) + "/"
  command = "python " + " ".join(shlex.quote(a.replace(root, "")) for a in sys.argv)
  print(run(cfg, folder.folder, PARTS.value, command, REUSE.value))
  folder.record_new()
  folder.finish()


if __name__ == "__main__":
  _cli.run(main)
