"""Reproduce the paper's latency and communication tables (and the cost-model cross-check).

For every model x cluster x placement method of the experiment config: decode latency per
token, prefill latency per request, cross-server bytes per token and local coverage from the
cost model, DanceMoE's reductions against the baselines (the headline) and its gap to the ILP
where the ILP solves; then, with ``crosscheck`` on, the cost model's per-step time against the
real dispatch on 8 host CPU devices; with ``extension_rows`` the routing extensions as extra rows
(``moe_edge/experiments/extension_rows.py``). Writes ``tables.csv``, ``tables.md``, ``crosscheck.csv``,
``timings.json`` and the plots into ``--out``, prints the Markdown and the headline.
Deterministic under ``--seed`` (the CSV holds no wall times).

  python experiments/reproduce_tables.py --config edge_tables --out results/tables
  python experiments/reproduce_tables.py --config configs/experiments/demo.py --out /tmp/tables
  python experiments/reproduce_tables.py --config.link_gbps=0.5 --config.clusters=edge_hetero_4 \
      --config.methods=dancemoe --config.methods=uniform_ep

Settings: the preset (``--config``, a file or a name under ``configs/experiments/``) with
``--config.KEY=VALUE`` overrides of any :class:`~moe_edge.experiments.config.ExperimentConfig`
field.

The library behind it is ``moe_edge.experiments`` (tables.py, workloads.py, crosscheck.py).
"""
import os

# The cross-check runs one server per host CPU device: 8 of them, before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from moe_edge.experiments.config import build_experiment  # noqa: E402
from moe_edge.experiments.tables import (format_headline, headline, ours_present,  # noqa: E402
                                          run_tables, write_tables)

import _cli  # noqa: E402

CONFIG = _cli.define_config("edge_tables")
OUT, OVERWRITE = _cli.define_output("results/tables")
#: What a tables run writes into --out (the trace cache and README.md are not its files).
OUTPUTS = ("tables.csv", "tables.md", "crosscheck.csv", "timings.json", "*.png")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress display on stderr.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines out of the progress display
  t0 = time.perf_counter()
  cfg = build_experiment(CONFIG.value)
  out = _cli.claim("reproduce_tables", OUT.value, CONFIG.value, OUTPUTS, seed=cfg.seed,
                   overwrite=OVERWRITE.value)
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"config {cfg.name}: {len(cfg.models)} models x {len(cfg.clusters)} clusters x "
        f"{len(cfg.methods)} methods, seed {cfg.seed}, calibration {cfg.calibration}",
        flush=True)
  result = run_tables(cfg, OUT.value, command=command, show_progress=PROGRESS.value)
  print(f"tables: {time.perf_counter() - t0:.0f} s", flush=True)
  md = result.markdown
  if cfg.crosscheck:
    from moe_edge.config import model_config
    from moe_edge.experiments.crosscheck import crosscheck
    from moe_edge.experiments.workloads import small_trace
    t1 = time.perf_counter()
    n = 8
    prof = small_trace(cfg, n, cfg.seed + cfg.profile_seed_offset)
    trace = small_trace(cfg, n, cfg.seed)
    rows, note = crosscheck(prof, trace, model_config("small_moe"), cfg.crosscheck_methods,
                            cfg.crosscheck_steps, cfg.crosscheck_repeats, cfg.copies, cfg.seed)
    md = write_tables(cfg, result.rows, OUT.value, command, rows, note, result.timings)
    print(f"cross-check: {time.perf_counter() - t1:.0f} s", flush=True)
  out.record_new()
  out.finish()
  print()
  print(md)
  for ours in ours_present(result.rows):
    print(f"\nHeadline ({ours}):\n" + format_headline(headline(result.rows, ours=ours)))
  print(f"\nwrote {OUT.value}/tables.csv, tables.md and the plots "
        f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)
