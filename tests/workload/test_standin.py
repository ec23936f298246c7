"""The DeepSeek-V2-Lite stand-in: OLMoE's real shares at DeepSeek's shape, sampled correctly."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import model_config
from moe_edge.workload.sampling import gumbel_top_k
from moe_edge.workload.standin import routing_stats_for, standin_stats
from moe_edge.workload.stats_traces import (StatsError, layer_distributions, load_routing_stats,
                                            sampling_log_weights)


def test_standin_keeps_olmoe_shares_at_deepseek_shape(shared_data):
  ds = model_config("deepseek_v2_lite")
  stats, note = routing_stats_for("deepseek_v2_lite")
  src = load_routing_stats("olmoe_1b_7b")
  assert "OLMoE-1B-7B" in note and "stand-in" in note
  assert (stats.num_layers, stats.num_experts, stats.top_k) == (ds.n_moe_layers, ds.n_experts,
                                                                 ds.top_k)
  assert stats.layers == (0, 12, 25)
  np.testing.assert_array_equal(stats.counts.sum(-1), ds.top_k * src.counts_top1.sum(-1))
  # rounding moves each count by less than one token-choice
  assert np.abs(stats.counts - ds.top_k * src.tokens_per_domain[:, None, None]
                * src.distributions()).max() < 1.0
  # permutation-invariant statistics of every layer equal those of its OLMoE source layer
  dist = layer_distributions(stats)
  for l_src, l_dst in zip(src.layers, stats.layers):
    np.testing.assert_allclose(np.sort(dist[:, l_dst], -1),
                               np.sort(src.distributions()[:, src.layers.index(l_src)], -1),
                               atol=1e-6)


def test_sampled_top6_inclusion_matches_the_standin(shared_data):
  stats = standin_stats("deepseek_v2_lite")
  log_w = sampling_log_weights(stats)[:, 12]                  # [D, E] layer 12 (recorded)
  rng = np.random.default_rng(0)
  n = 20000
  picks = gumbel_top_k(np.broadcast_to(log_w[3], (n, 64)), 6, rng)  # github
  freq = np.bincount(picks.ravel(), minlength=64) / n
  want = stats.inclusion()[3, 1]
  assert np.abs(freq - want).max() < 4 * np.sqrt(want.max() / n) + 1e-3


def test_standin_bad_inputs(shared_data):
  with pytest.raises(StatsError, match="no routing statistics drive 'qwen1_5_moe_a2_7b'"):
    routing_stats_for("qwen1_5_moe_a2_7b")
  other = dataclasses.replace(model_config("deepseek_v2_lite"), name="ds_60", n_experts=60)
  with pytest.raises(StatsError, match="same expert count"):
    standin_stats(other)
  hot = dataclasses.replace(model_config("deepseek_v2_lite"), name="ds_k60", top_k=60)
  with pytest.raises(StatsError, match="more than every token"):
    standin_stats(hot)
