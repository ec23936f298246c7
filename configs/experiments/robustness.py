"""Robustness of the latency search (experiments/robustness.py): the keys of
moe_edge.experiments.robustness.RobustnessConfig. OLMoE-1B-7B real routing statistics, 5 seeds x
alpha in {0.6, 0.8, 1.0} x three home families x homogeneous_4 and edge_hetero_4; 2048 tokens per
server per trace (a quarter of the tables', to keep the run near 10 minutes on two CPU cores)."""
from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      name="robustness", model="olmoe_1b_7b", clusters=("homogeneous_4", "edge_hetero_4"),
      families=("one_home", "swap", "mix"), alphas=(0.6, 0.8, 1.0), seeds=(0, 1, 2, 3, 4),
      profile_offset=1000, tokens_per_server=2048, request_len=128, link_gbps=1.0, copies=1.5,
      calibration="h200_grouped", decode_batch=8, request_rate=0.1, request_output_tokens=64,
      tie=1e-3, loss_limit=0.01))
