"""The full tables: five models x two edge clusters x every placement method.

OLMoE-1B-7B and Mixtral-8x7B driven by their real routing statistics, the small trained model by
its own routing over real held-out text, DeepSeek-V2-Lite and Qwen1.5-MoE by the small model's
traces mapped to their expert counts; edge_hetero_4 and edge_hetero_8 at 1 Gbps, 1.5 copies of
expert memory, Mixtral at 4-bit; the ILP where it solves; the cost-model cross-check on 8 host
CPU devices; the routing extensions as extra rows (substitution and budgeted selection with their
loss change on small_moe, the weight-free drop on the others); the request-level columns
(the statistics-driven models' placements serving 120 s of Poisson arrivals, 0.05 per server
and second, on the request-level simulator); the lower bound with the facility-location LP on
every setting (at most 100,000 routing variables; DeepSeek-V2-Lite on 8 servers has 93,184),
whose rounded hosting also starts best_known. About 25 minutes on two CPU cores once the
small-model traces are cached (the LPs take most of it).
"""
from ml_collections import config_dict

from moe_edge.experiments.config import experiment_preset


def get_config() -> config_dict.ConfigDict:
  return experiment_preset(
      name="edge_tables", description=__doc__.splitlines()[0], seed=0,
      models=("olmoe_1b_7b", "mixtral_8x7b", "small_moe", "deepseek_v2_lite",
              "qwen1_5_moe_a2_7b"),
      clusters=("edge_hetero_4", "edge_hetero_8"),
      methods=("all",),
      link_gbps=1.0, copies=1.5, bytes_per_param=(("mixtral_8x7b", 0.5),), alpha=0.8,
      tokens_per_server=8192, request_len=128, small_requests_per_server=32, small_seq_len=128,
      trace_cache="results/tables/traces", decode_batch=8, prefill_requests=1,
      calibration="h200_grouped", ilp_time_limit=60.0, bound_lp_max_cells=100_000,
      crosscheck=True,
      crosscheck_methods=("uniform_ep", "greedy_local", "dancemoe"), crosscheck_steps=4,
      crosscheck_repeats=3, extension_rows=True, substitution_threshold=0.2,
      budget_remote_choices=1.0, extension_calib_requests=8,
      request_duration_s=120.0, request_rate=0.05, request_output_tokens=64)
