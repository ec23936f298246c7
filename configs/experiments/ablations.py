"""The ablation sweeps: link bandwidth, cluster size, memory budget, locality, DanceMoE's parts
and migration under drift. OLMoE-1B-7B statistics (plus Mixtral-8x7B at 4-bit where cheap) on
edge_hetero_4 unless the sweep varies the cluster; the extensions sweep (substitution / drop
threshold) on the trained small model. A few minutes on two CPU cores.
"""
import math

from ml_collections import config_dict

from moe_edge.experiments.config import experiment_preset


def get_config() -> config_dict.ConfigDict:
  return experiment_preset(
      name="ablations", description=__doc__.splitlines()[0], seed=0,
      models=("olmoe_1b_7b", "mixtral_8x7b"), clusters=("edge_hetero_4", "edge_hetero_8"),
      link_gbps=1.0, copies=1.5, bytes_per_param=(("mixtral_8x7b", 0.5),), alpha=0.8,
      request_len=128, decode_batch=8, prefill_requests=1, calibration="h200_grouped",
      sweeps=("link_bandwidth", "num_servers", "memory", "alpha", "parts", "migration",
              "extensions"),
      sweep_models=("olmoe_1b_7b", "mixtral_8x7b"), sweep_cluster="edge_hetero_4",
      sweep_methods=("ours", "paper", "baseline"),
      sweep_tokens_per_server=8192,
      link_gbps_values=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
      server_counts=(2, 3, 4, 6, 8, 12, 16),
      copies_values=(1.0, 1.25, 1.5, 2.0, 3.0, math.inf),
      alpha_values=(0.2, 0.4, 0.6, 0.8, 0.9, 1.0),
      migration_steps=96, migration_interval=8, migration_request_len=64,
      migration_max_moves=96, extension_thresholds=(0.0, 0.1, 0.2, 0.3, 0.5),
      extension_calib_requests=8, extension_rows=True, substitution_threshold=0.2,
      budget_remote_choices=1.0)
