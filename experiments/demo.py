"""`make demo`: the whole pipeline on the small default config, end to end, in a few minutes.

1. load the shipped trained checkpoint (``checkpoints/small_moe/final``);
2. build per-server request streams from real held-out text (server i mostly serves domain i);
3. run the model over them and record an ActivationTrace;
4. print per-server, per-layer activation statistics (hot-set coverage, TV distance between
   servers) for that trace and for the real OLMoE-1B-7B / Mixtral-8x7B statistics;
5. serve a few requests per server on host CPU devices (one per server) with a DanceMoE
   placement: KV-cache decoding, continuous batching, and print TTFT / TPOT / latency;
6. place experts with every method and print a small version of the paper's tables;
7. the quick paper table: the paper's testbed and workloads on the request-level simulator,
   our ratios beside the paper's (``moe_edge/experiments/paper_readme.py``, ``out/demo/paper``).

  python experiments/demo.py [--num_servers 4 --alpha 0.8 --requests_per_server 24]
"""
from __future__ import annotations

import os
import sys
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
flags.DEFINE_integer("serve_requests", 2, "Requests per server of the serving step.")


def serve_section(model, trace, out: Path) -> str:
  """Serve ``--serve_requests`` per server on the engine with a DanceMoE placement planned on
  ``trace``; write the metrics into ``out/serve`` and return the printed summary."""
  import jax  # noqa: PLC0415
  from moe_edge.config import cluster_config, with_expert_memory  # noqa: PLC0415
  from moe_edge.parallel.mesh import server_mesh  # noqa: PLC0415
  from moe_edge.parallel.runtime import ServingRuntime  # noqa: PLC0415
  from moe_edge.placement import place  # noqa: PLC0415
  from moe_edge.placement.problem import PlacementProblem  # noqa: PLC0415
  from moe_edge.serving import metrics, report  # noqa: PLC0415
  from moe_edge.serving.engine import Engine  # noqa: PLC0415
  from moe_edge.serving.scheduler import SchedulerOptions  # noqa: PLC0415
  from moe_edge.serving.step_cost import StepCost  # noqa: PLC0415
  from moe_edge.workload.requests import make_requests  # noqa: PLC0415

  n, cfg = FLAGS.num_servers, model.cfg
  cluster = cluster_config("edge_hetero_4", num_servers=n) if n != 4 else cluster_config(
      "edge_hetero_4")
  cluster = with_expert_memory(cluster, cfg, 1.5)
  placement = place("dancemoe", PlacementProblem.from_trace(trace, cfg, cluster))
  rt = ServingRuntime(server_mesh(n), model, placement)
  engine = Engine(rt, model, SchedulerOptions(max_batch=2, token_budget=64, prefill_chunk=32,
                                              kv_tokens=2 * cfg.max_seq_len),
                  cost=StepCost(cfg, cluster))
  requests = make_requests(n, (16, 32), 16, FLAGS.seed, rate=4.0,
                           requests_per_server=FLAGS.serve_requests, alpha=FLAGS.alpha)
  engine.compile()
  res = engine.serve(requests)
  summary = metrics.summarize(res.loop.requests, res.loop.steps)
  summary.update(
      equal_to_single_device=not report.tokens_equal(
          res.tokens, report.single_device_tokens(model, requests)),
      bytes_equal_cost_model=res.dispatch_bytes == res.cost_bytes,
      coverage=report.coverage(res.routing, [rt.placement] * len(res.routing)), servers=n,
      method="dancemoe", clock=f"wall, {jax.device_count()} host CPU devices")
  metrics.write_run(out / "serve", res.loop.requests, res.loop.steps, n, summary)
  return report.format_summary(summary)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  if "jax" not in sys.modules:  # one host CPU device per server, before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.num_servers}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  from moe_edge.config import model_config
  from moe_edge.experiments.paper_readme import demo_table
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
  print(f"[1/7] restored {FLAGS.checkpoint} (small_moe, step {step}, "
        f"{cfg.total_params / 1e6:.1f} M params)")

  requests = make_streams(FLAGS.num_servers, FLAGS.requests_per_server, FLAGS.seq_len,
                          FLAGS.alpha, FLAGS.seed, split="heldout")
  print(f"[2/7] {len(requests)} requests of {FLAGS.seq_len} bytes from real held-out text, "
        f"{FLAGS.num_servers} servers, locality alpha={FLAGS.alpha}")

  trace = record_trace(model, cfg, requests, FLAGS.num_servers, batch_size=16,
                       source="corpus/heldout", note="experiments/demo.py")
  path = trace.save(out / "small_moe_trace.npz")
  print(f"[3/7] recorded {trace.num_tokens:,} tokens x {trace.num_layers} MoE layers -> {path}")

  print("[4/7] activation statistics\n")
  print(format_summary(summarize(trace), title="small_moe (trained here) on real text"))
  for name in ("olmoe_1b_7b", "mixtral_8x7b"):
    stats = load_routing_stats(name)
    print(format_domain_tv(stats))
  print(f"[5/7] serving {FLAGS.serve_requests} requests per server (Poisson arrivals, 4/s) on "
        f"the engine: KV cache, continuous batching, DanceMoE placement\n")
  print(serve_section(model, trace, out), "\n")
  print("[6/7] placement and cost tables (small version of results/tables/)\n")
  print(run_demo_tables(out, small_model_trace=path))
  print("[7/7] the paper's experiment, quick (configs/experiments/paper_testbed_quick.py; "
        "full: experiments/paper_table.py, results/paper/)\n")
  print(demo_table(out / "paper", log=lambda s: print(s, flush=True)))
  print(f"demo finished in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
