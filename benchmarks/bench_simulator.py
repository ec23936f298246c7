"""Speed of the request-level simulator: one simulated hour of a 3-server Poisson workload, and
a 256-server cluster.

Workload (the shape of the paper's testbed runs, PAPER.md): 3 servers serving github, arxiv and
wikipedia (locality 1.0), Poisson arrivals with a mean inter-arrival of 10 s per server for one
hour, prompts of 128-512 tokens cut from real held-out text, 128 output tokens; OLMoE-1B-7B's
shape and its real per-domain routing statistics (sampled routing); 3 RTX 3090 servers on
500 Mbps links (``homogeneous_4`` with 3 servers: the paper's A100 testbed config is not part of
this benchmark), vanilla expert parallelism (expert ``e`` on server ``e mod 3``). Scheduler: 8
slots, 512 tokens per step, chunks of 512. Reported: wall and CPU seconds per run (median of
``--repeats``; CPU time is this process's, which other load on a shared machine does not
inflate), steps, requests and the mean latency. Then the same workload shape on 256 servers
(one request per server) to show a large cluster runs.

  .venv/bin/python benchmarks/bench_simulator.py        # -> results/bench_simulator/cpu.json
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moe_edge.config import cluster_config, model_config
from moe_edge.core.problem import Placement
from moe_edge.serving.metrics import summarize
from moe_edge.serving.scheduler import SchedulerOptions
from moe_edge.serving.simulator import SampledRouting, simulate
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import make_requests
from moe_edge.workload.stats_traces import load_routing_stats

FLAGS = flags.FLAGS
flags.DEFINE_float("hours", 1.0, "Simulated hours.")
flags.DEFINE_integer("repeats", 3, "Runs (the median is reported).")
flags.DEFINE_string("out", "results/bench_simulator/cpu.json", "Output JSON.")


def _uniform(cfg, cluster) -> Placement:
  n, l, e = cluster.num_servers, cfg.n_moe_layers, cfg.n_experts
  hosts = np.zeros((n, l, e), bool)
  hosts[np.arange(e) % n, :, np.arange(e)] = True
  return Placement.from_hosts(hosts, cfg, cluster, method="uniform_ep")


def _run(requests, cluster, cfg, stats, opts) -> dict:
  t0, c0 = time.perf_counter(), time.process_time()
  routing = SampledRouting(stats, requests.domain, seed=0)
  res = simulate(requests, _uniform(cfg, cluster), StepCost(cfg, cluster), opts, routing)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  s = summarize(res.loop.requests, res.loop.steps)
  return dict(wall_s=wall, cpu_s=cpu, steps=s["steps"], requests=s["requests"],
              simulated_s=s["span_s"], mean_latency_s=s["latency_ms"]["mean"] / 1e3)


def main(argv):
  del argv
  cfg = model_config("olmoe_1b_7b")
  stats = load_routing_stats("olmoe_1b_7b")
  opts = SchedulerOptions(max_batch=8, token_budget=512, prefill_chunk=512,
                          kv_tokens=8 * cfg.max_seq_len)
  cluster = cluster_config("homogeneous_4", num_servers=3, link_gbps=0.5)
  requests = make_requests(3, (128, 512), 128, seed=0, rate=0.1,
                           duration_s=3600.0 * FLAGS.hours, alpha=1.0,
                           home_domains=("github", "arxiv", "wikipedia"))
  runs = []
  for i in range(FLAGS.repeats):
    runs.append(_run(requests, cluster, cfg, stats, opts))
    print(f"3 servers, {FLAGS.hours:g} h: run {i}: {runs[-1]['wall_s']:.1f} s wall, "
          f"{runs[-1]['cpu_s']:.1f} s CPU, {runs[-1]['steps']} steps, {runs[-1]['requests']} "
          f"requests, mean latency {runs[-1]['mean_latency_s']:.1f} s", flush=True)
  big = cluster_config("homogeneous_4", num_servers=256, link_gbps=0.5)
  big_requests = make_requests(256, (128, 512), 128, seed=0, requests_per_server=1,
                               alpha=1.0)
  large = _run(big_requests, big, cfg, stats, opts)
  print(f"256 servers, 1 request each: {large['wall_s']:.1f} s wall, {large['steps']} steps",
        flush=True)
  result = dict(
      workload="3 servers (github, arxiv, wikipedia; alpha 1), Poisson 10 s mean inter-arrival "
               "per server, prompts 128-512, 128 outputs, OLMoE-1B-7B stats, 3 x RTX 3090 at "
               "500 Mbps, uniform_ep",
      hours=FLAGS.hours, cpu_count=os.cpu_count(),
      load_average=os.getloadavg()[0], runs=runs,
      median_wall_s=statistics.median(r["wall_s"] for r in runs),
      median_cpu_s=statistics.median(r["cpu_s"] for r in runs), servers_256=large)
  out = Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"median {result['median_wall_s']:.1f} s wall, {result['median_cpu_s']:.1f} s CPU "
        f"per simulated hour; wrote {out}")


if __name__ == "__main__":
  app.run(main)
