"""Reproduce the paper's latency and communication tables (and the cost-model cross-check).

For every model x cluster x placement method of the experiment config: decode latency per
token, prefill latency per request, cross-server bytes per token and local coverage from the
cost model, DanceMoE's reductions against the baselines (the headline) and its gap to the ILP
where the ILP solves; then, with ``crosscheck`` on, the cost model's per-step time against the
real dispatch on 8 host CPU devices; with ``extension_rows`` the routing extensions as extra rows
(``moe_edge/experiments/extension_rows.py``). Writes ``tables.csv``, ``tables.md``, ``crosscheck.csv``,
``timings.json`` and the plots into ``--out``, prints the Markdown and the headline.
Deterministic under ``--seed`` (the CSV holds no wall times).

  python experiments/reproduce_tables.py --config paper_tables --out results/tables
  python experiments/reproduce_tables.py --config demo --out /tmp/tables
  python experiments/reproduce_tables.py --methods dancemoe,uniform_ep --clusters edge_hetero_4

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

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "paper_tables", "Experiment preset (configs/experiments/).")
flags.DEFINE_string("out", "results/tables", "Output folder.")
flags.DEFINE_integer("seed", None, "Seed of every trace and method (default: the config's).")
flags.DEFINE_list("methods", None, "Override the config's placement methods.")
flags.DEFINE_list("clusters", None, "Override the config's clusters.")
flags.DEFINE_list("models", None, "Override the config's models.")
flags.DEFINE_float("copies", None, "Override the expert memory (copies of the experts).")
flags.DEFINE_float("link_gbps", None, "Override the link bandwidth (Gbit/s).")
flags.DEFINE_enum("calibration", None, ["datasheet", "h100_kernels", "h200_grouped"],
                  "Override the calibration.")
flags.DEFINE_string("trace_cache", None, "Override the small-model trace cache folder "
                    "('' = no cache).")
flags.DEFINE_bool("crosscheck", None, "Override whether the cost-model cross-check runs.")
flags.DEFINE_bool("extension_rows", None, "Override whether the routing extensions' rows "
                  "(dancemoe+subst / +budget / +drop) are added.")
flags.DEFINE_bool("progress", True, "Show a progress display on stderr.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's INFO lines out of the progress display
  from moe_edge.config import ConfigError
  from moe_edge.experiments.config import load_experiment, with_overrides
  from moe_edge.experiments.tables import (format_headline, headline, ours_present,
                                            run_tables, write_tables)
  t0 = time.perf_counter()
  try:
    cfg = with_overrides(
        load_experiment(FLAGS.config), seed=FLAGS.seed,
        methods=tuple(FLAGS.methods) if FLAGS.methods else None,
        clusters=tuple(FLAGS.clusters) if FLAGS.clusters else None,
        models=tuple(FLAGS.models) if FLAGS.models else None, copies=FLAGS.copies,
        link_gbps=FLAGS.link_gbps, calibration=FLAGS.calibration,
        trace_cache=FLAGS.trace_cache, crosscheck=FLAGS.crosscheck,
        extension_rows=FLAGS.extension_rows)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  print(f"config {cfg.name}: {len(cfg.models)} models x {len(cfg.clusters)} clusters x "
        f"{len(cfg.methods)} methods, seed {cfg.seed}, calibration {cfg.calibration}",
        flush=True)
  result = run_tables(cfg, FLAGS.out, command=command, show_progress=FLAGS.progress)
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
    md = write_tables(cfg, result.rows, FLAGS.out, command, rows, note, result.timings)
    print(f"cross-check: {time.perf_counter() - t1:.0f} s", flush=True)
  print()
  print(md)
  for ours in ours_present(result.rows):
    print(f"\nHeadline ({ours}):\n" + format_headline(headline(result.rows, ours=ours)))
  print(f"\nwrote {FLAGS.out}/tables.csv, tables.md and the plots "
        f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
