"""Request-level latency columns of the edge tables (``reproduce_tables.py``): each placement
served by the request-level simulator (:mod:`moe_edge.serving.simulator`).

Workload (``ExperimentConfig.request_*``): server ``i`` mostly serves ``DOMAINS[i % 5]``
(locality ``alpha``, as the tables' traces), Poisson arrivals at ``request_rate`` per server for
``request_duration_s`` seconds, prompts of ``request_len`` tokens from held-out text, outputs
of ``request_output_tokens``; routing sampled from the model's statistics (its own, or a
stand-in: :func:`moe_edge.workload.standin.routing_stats_for`). The tables' memory model
(``copies``) holds experts only, so every server gets KV room for ``decode_batch`` requests. Models without statistics (the
small trained model, Qwen1.5-MoE driven by mapped traces) get no request columns.
"""
from __future__ import annotations

import math

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.problem import Placement
from moe_edge.cost.calibrate import Calibration
from moe_edge.cost.model import CostModel
from moe_edge.serving.scheduler import SchedulerOptions
from moe_edge.serving.simulator import QueueDivergesError, SampledRouting, simulate
from moe_edge.workload.requests import make_requests
from moe_edge.workload.standin import STANDINS
from moe_edge.workload.standin import routing_stats_for
from moe_edge.workload.stats_traces import STATS_MODELS

REQUEST_COLUMNS = ("request_latency_s", "request_p99_s", "request_ttft_s", "request_tpot_ms",
                   "request_busy")


def has_request_columns(model_name: str) -> bool:
  return model_name in STATS_MODELS or model_name in STANDINS


def request_metrics(cfg, model_name: str, model: ModelConfig, cluster: ClusterConfig,
                    calibration: Calibration | None, placement: Placement) -> dict:
  """The :data:`REQUEST_COLUMNS` of one placement (``{}`` when off or without statistics;
  ``inf`` latencies when the queue diverges)."""
  if cfg.request_duration_s <= 0 or not has_request_columns(model_name):
    return {}
  stats, _ = routing_stats_for(model_name)
  n = cluster.num_servers
  requests = make_requests(n, int(cfg.request_len), int(cfg.request_output_tokens), cfg.seed,
                           rate=cfg.request_rate, duration_s=cfg.request_duration_s,
                           alpha=cfg.alpha)
  cost = CostModel.build(model, cluster, calibration)
  opts = SchedulerOptions(max_batch=cfg.decode_batch, token_budget=max(cfg.request_len,
                                                                       cfg.decode_batch),
                          prefill_chunk=cfg.request_len)
  kv = np.full(n, cfg.decode_batch * (cfg.request_len + cfg.request_output_tokens))
  try:
    routing = SampledRouting(stats, requests.domain, cfg.seed)
    res = simulate(requests, placement, cost, opts, routing, kv_tokens=kv)
  except QueueDivergesError:
    return dict(request_latency_s=math.inf, request_p99_s=math.inf, request_ttft_s=math.inf,
                request_tpot_ms=math.inf, request_busy=1.0)
  lat = res.latencies()
  ttft = np.array([r.first_token_s - r.arrival_s for r in res.requests])
  tpot = np.array([(r.finish_s - r.first_token_s) / (r.output_tokens - 1)
                   for r in res.requests if r.output_tokens > 1])
  return dict(request_latency_s=float(lat.mean()),
              request_p99_s=float(np.percentile(lat, 99)), request_ttft_s=float(ttft.mean()),
              request_tpot_ms=1e3 * float(tpot.mean()) if tpot.size else math.nan,
              request_busy=res.busy_fraction)
