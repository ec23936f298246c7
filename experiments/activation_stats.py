"""Print activation statistics: per server and layer, how much of the routing the server's own
hottest experts capture, its entropy, and how different the servers' distributions are.

  python experiments/activation_stats.py --trace traces/small_moe_4srv.npz
  python experiments/activation_stats.py --real_stats          # the real OLMoE / Mixtral counts

With ``--real_stats`` it also prints, for the real routing counts of OLMoE-1B-7B and
Mixtral-8x7B, the total-variation distance between the five domains at each recorded layer and
the hottest expert's load (``moe_edge.workload.stats_traces.format_domain_tv``).
"""
from __future__ import annotations

from absl import app, flags

from moe_edge.io import cli
from moe_edge.workload.stats import format_summary, summarize
from moe_edge.workload.stats_traces import STATS_MODELS, format_domain_tv, load_routing_stats
from moe_edge.workload.traces import ActivationTrace

FLAGS = flags.FLAGS
flags.DEFINE_list("trace", [], "Trace .npz files (comma-separated).")
flags.DEFINE_float("hot_fraction", 0.25, "Hot-set size m as a share of the experts per layer.")
flags.DEFINE_bool("real_stats", False, "Also print the domain distances of the real counts.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.trace and not FLAGS.real_stats:
    raise app.UsageError("give --trace PATH[,PATH...] and/or --real_stats.")
  cli.check_flags(FLAGS, ranges={"hot_fraction": (0.0, 1.0, True)})
  traces = [(path, ActivationTrace.load(path)) for path in FLAGS.trace]  # inputs first
  blocks = []
  if FLAGS.real_stats:
    blocks += [format_domain_tv(load_routing_stats(name)) for name in STATS_MODELS]
  for path, trace in traces:
    blocks.append(format_summary(summarize(trace, FLAGS.hot_fraction),
                                 title=f"== {path} ({trace.source})"))
  print("\n\n".join(blocks))


if __name__ == "__main__":
  cli.run(main)
