"""`make demo`: the whole pipeline on the small default config, end to end, in a few minutes.

1. load the shipped trained checkpoint (``checkpoints/small_moe/final``);
2. build per-server request streams from real held-out text (server i mostly serves domain i);
3. run the model over them and record an ActivationTrace;
4. print per-server, per-layer activation statistics (hot-set coverage, TV distance between
   servers) for that trace and for the real OLMoE-1B-7B / Mixtral-8x7B statistics;
5. place experts with every method and print a small version of the paper's tables.

  python experiments/demo.py [--num_servers 4 --alpha 0.8 --requests_per_server 24]
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "checkpoints/small_moe/final", "Trained small model.")
flags.DEFINE_integer("num_servers", 4, "Servers, one request stream each.")
flags.DEFINE_integer("requests_per_server", 24, "Requests per server.")
flags.DEFINE_integer("seq_len", 256, "Tokens per request.")
flags.DEFINE_float("alpha", 0.8, "Share of a server's requests from its home domain.")
flags.DEFINE_integer("seed", 0, "Seed of the streams and of every sampled trace.")
flags.DEFINE_string("out", "out/demo", "Where the demo writes its trace and tables.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  from moe_edge.config import model_config
  from moe_edge.experiments.tables import run_demo_tables
  from moe_edge.model.checkpoint import restore_checkpoint
  from moe_edge.workload.record import record_trace
  from moe_edge.workload.stats import format_summary, summarize
  from moe_edge.workload.stats_traces import format_domain_tv, load_routing_stats
  from moe_edge.workload.streams import make_streams

  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  cfg = model_config("small_moe")
  model, _, step = restore_checkpoint(FLAGS.checkpoint, cfg)
  print(f"[1/5] restored {FLAGS.checkpoint} (small_moe, step {step}, "
        f"{cfg.total_params / 1e6:.1f} M params)")

  requests = make_streams(FLAGS.num_servers, FLAGS.requests_per_server, FLAGS.seq_len,
                          FLAGS.alpha, FLAGS.seed, split="heldout")
  print(f"[2/5] {len(requests)} requests of {FLAGS.seq_len} bytes from real held-out text, "
        f"{FLAGS.num_servers} servers, locality alpha={FLAGS.alpha}")

  trace = record_trace(model, cfg, requests, FLAGS.num_servers, batch_size=16,
                       source="corpus/heldout", note="experiments/demo.py")
  path = trace.save(out / "small_moe_trace.npz")
  print(f"[3/5] recorded {trace.num_tokens:,} tokens x {trace.num_layers} MoE layers -> {path}")

  print("[4/5] activation statistics\n")
  print(format_summary(summarize(trace), title="small_moe (trained here) on real text"))
  for name in ("olmoe_1b_7b", "mixtral_8x7b"):
    stats = load_routing_stats(name)
    print(format_domain_tv(stats))
  print("[5/5] placement and cost tables (small version of results/tables/)\n")
  print(run_demo_tables(out, small_model_trace=path))
  print(f"demo finished in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
