"""A small version of the tables for `make demo`: seconds to a minute on two CPU cores.

OLMoE-1B-7B and Mixtral-8x7B (4-bit) statistics on edge_hetero_4, every method but the ILP,
1,024 tokens per server; no small-model recording unless the demo passes its own trace; no
cross-check.
"""
from ml_collections import config_dict

from moe_edge.experiments.config import experiment_preset


def get_config() -> config_dict.ConfigDict:
  return experiment_preset(
      name="demo", description=__doc__.splitlines()[0], seed=0,
      models=("olmoe_1b_7b", "mixtral_8x7b"), clusters=("edge_hetero_4",),
      methods=("ours", "paper", "baseline"),
      link_gbps=1.0, copies=1.5, bytes_per_param=(("mixtral_8x7b", 0.5),), alpha=0.8,
      tokens_per_server=1024, request_len=128, trace_cache="", decode_batch=8,
      prefill_requests=1, calibration="h200_grouped", crosscheck=False)
