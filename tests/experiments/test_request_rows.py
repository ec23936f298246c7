"""Request-level columns of the edge tables: on for statistics-driven models, off otherwise."""
import dataclasses

import numpy as np

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.core.problem import PlacementProblem
from moe_edge.experiments.config import load_experiment
from moe_edge.experiments.request_rows import REQUEST_COLUMNS, request_metrics
from moe_edge.experiments.workloads import build_workload, workload_kind
from moe_edge.placement import registry
from moe_edge.workload.standin import STANDIN_NOTE, standin_stats


def test_request_columns_for_statistics_models_only():
  cfg = dataclasses.replace(load_experiment("demo"), request_duration_s=20.0, request_rate=0.2,
                            request_len=64, request_output_tokens=16)
  model = model_config("olmoe_1b_7b")
  cluster = with_expert_memory(cluster_config("edge_hetero_4"), model, 1.5)
  freq = np.full((4, model.n_moe_layers, model.n_experts), model.top_k / model.n_experts)
  placement = registry.place("uniform_ep", PlacementProblem.build(model, cluster, freq))
  got = request_metrics(cfg, "olmoe_1b_7b", model, cluster, None, placement)
  assert set(got) == set(REQUEST_COLUMNS)
  assert 0 < got["request_ttft_s"] < got["request_latency_s"] <= got["request_p99_s"]
  assert 0 < got["request_busy"] <= 1
  # same seed, same numbers; off, or a model without statistics: no columns
  assert request_metrics(cfg, "olmoe_1b_7b", model, cluster, None, placement) == got
  off = dataclasses.replace(cfg, request_duration_s=0.0)
  assert request_metrics(off, "olmoe_1b_7b", model, cluster, None, placement) == {}
  assert request_metrics(cfg, "small_moe", model, cluster, None, placement) == {}


def test_tables_drive_deepseek_by_the_paper_standin():
  """results/tables' DeepSeek-V2-Lite is the paper experiment's workload: OLMoE's statistics
  reshaped (standin.py), not mapped small-model traces; its layer-0 expert shares follow them."""
  cfg = dataclasses.replace(load_experiment("demo"), tokens_per_server=4096, alpha=1.0)
  work = build_workload(cfg, "deepseek_v2_lite", 2)
  assert workload_kind("deepseek_v2_lite") == "standin" == work.kind
  assert STANDIN_NOTE in work.note and work.trace.model == "deepseek_v2_lite"
  stats = standin_stats("deepseek_v2_lite")
  ids, srv = work.trace.expert_ids, work.trace.server
  for n in range(2):  # alpha 1: server n serves only stats.domains[n]
    got = np.bincount(ids[srv == n, 0].ravel(), minlength=64) / ids[srv == n, 0].size
    want = stats.distributions()[n, 0]
    assert np.abs(got - want).sum() < 0.1, np.abs(got - want).sum()
