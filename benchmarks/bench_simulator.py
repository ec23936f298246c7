"""Speed of the request-level simulator: one simulated hour of the paper's testbed workload, and
the testbed at 256 GPUs.

Workload: the paper experiment's own (``configs/experiments/paper_testbed.py``,
``configs/clusters/paper_testbed.py``): DeepSeek-V2-Lite (routing: the OLMoE stand-in) on the
3-server A100 testbed at 500 Mbps, ``specialised`` (github, arxiv, wikipedia; alpha 1, Poisson
arrivals with 10 s mean inter-arrival per server, prompts of 128-512 tokens from real text, 128
outputs), the config's scheduler, KV budgets from the placement, attention priced
(``experiments.paper_table.serve``), ``uniform_ep`` on the expected problem. Reported: wall and
CPU seconds per run (median of ``--repeats``; CPU time is this process's, which other load on a
shared machine does not inflate), steps, requests and the mean latency. Then the testbed at 256 GPUs
(192 servers, 30 s of arrivals, routing pools of 4096) to show a large cluster runs.

  .venv/bin/python benchmarks/bench_simulator.py        # -> results/bench_simulator/cpu.json
"""
from __future__ import annotations

import json
import math
import os
import runpy
import statistics
import time
from pathlib import Path

from absl import app, flags

from moe_edge.experiments.paper_config import paper_config
from moe_edge.io import atomic, check_output_file, cli
from moe_edge.experiments.paper_table import cost_model, serve
from moe_edge.experiments.paper_workload import build_setting, workload_requests
from moe_edge.placement import registry
from moe_edge.serving.metrics import summarize

FLAGS = flags.FLAGS
flags.DEFINE_float("hours", 1.0, "Simulated hours.")
flags.DEFINE_integer("repeats", 3, "Runs (the median is reported).")
flags.DEFINE_string("out", "results/bench_simulator/cpu.json", "Output JSON.")


def _run(cfg, setting, requests, pool: int = 0) -> dict:
  t0, c0 = time.perf_counter(), time.process_time()
  placement = registry.place("uniform_ep", setting.problem)
  res = serve(cfg, setting, cost_model(cfg, setting), placement, requests, cfg.seed, pool=pool)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  s = summarize(res.loop.requests, res.loop.steps)
  return dict(wall_s=wall, cpu_s=cpu, steps=s["steps"], requests=s["requests"],
              simulated_s=s["span_s"], mean_latency_s=s["latency_ms"]["mean"] / 1e3)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.check_flags(FLAGS, at_least_1=("repeats",), ranges={"hours": (0.0, math.inf, True)})
  check_output_file(FLAGS.out, overwrite=True, suffix=".json")  # before the benchmark
  root = Path(__file__).resolve().parents[1]
  cfg = paper_config(runpy.run_path(str(root / "configs/experiments/paper_testbed.py"))[
      "get_config"]())
  setting = build_setting(cfg, "deepseek_v2_lite", "specialised")
  n = setting.cluster.num_servers
  requests = workload_requests(cfg, setting.workload, n, 3600.0 * FLAGS.hours, cfg.seed)
  runs = []
  for i in range(FLAGS.repeats):
    runs.append(_run(cfg, setting, requests))
    print(f"{n} servers, {FLAGS.hours:g} h: run {i}: {runs[-1]['wall_s']:.1f} s wall, "
          f"{runs[-1]['cpu_s']:.1f} s CPU, {runs[-1]['steps']} steps, {runs[-1]['requests']} "
          f"requests, mean latency {runs[-1]['mean_latency_s']:.1f} s", flush=True)
  big = build_setting(cfg, "deepseek_v2_lite", "specialised", num_gpus=256)  # 192 servers
  nb = big.cluster.num_servers
  big_requests = workload_requests(cfg, big.workload, nb, 30.0, cfg.seed)
  large = _run(cfg, big, big_requests, pool=4096)
  print(f"{nb} servers, {large['requests']} requests: {large['wall_s']:.1f} s wall, "
        f"{large['steps']} steps", flush=True)
  result = dict(
      workload="paper testbed (configs/experiments/paper_testbed.py): deepseek_v2_lite "
               "(OLMoE stand-in), specialised, 3 servers (1, 1, 2 A100-40GB) at 500 Mbps, "
               "uniform_ep, attention priced, KV from the placement",
      hours=FLAGS.hours, cpu_count=os.cpu_count(),
      load_average=os.getloadavg()[0], runs=runs,
      median_wall_s=statistics.median(r["wall_s"] for r in runs),
      median_cpu_s=statistics.median(r["cpu_s"] for r in runs), servers_256=large)
  out = Path(FLAGS.out)
  atomic.write_text(out, json.dumps(result, indent=1) + "\n")
  print(f"median {result['median_wall_s']:.1f} s wall, {result['median_cpu_s']:.1f} s CPU "
        f"per simulated hour; wrote {out}")


if __name__ == "__main__":
  cli.run(main)
