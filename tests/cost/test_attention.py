"""Attention cost and KV memory: closed forms against token-by-token numpy references."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.cost import attention
from moe_edge.cost import model as cost_model

MODELS = ("mixtral_8x7b", "deepseek_v2_lite", "olmoe_1b_7b", "tiny")


def _reference_cache(model, context):
  """The arrays a cache of ``context`` tokens holds (float16 stands in for bf16: 2 bytes)."""
  if model.kv_lora_rank:
    return [np.zeros((model.n_layers, context, model.kv_lora_rank), np.float16),
            np.zeros((model.n_layers, context, model.qk_rope_head_dim), np.float16)]
  shape = (model.n_layers, context, model.n_kv_heads, model.head_dim)
  return [np.zeros(shape, np.float16), np.zeros(shape, np.float16)]


def _reference_flops(model, context, new):
  """Token by token: the query at position p scores p + 1 keys and mixes p + 1 values."""
  total = 0
  for p in range(context - new, context):
    keys = p + 1
    if model.kv_lora_rank:  # absorbed MLA: scores over latent + rope key, values over latent
      per = 2 * model.n_heads * (model.kv_lora_rank + model.qk_rope_head_dim) + \
          2 * model.n_heads * model.kv_lora_rank
    else:
      per = 2 * model.n_heads * model.head_dim * 2
    total += model.n_layers * per * keys
  return total


@pytest.mark.parametrize("name", MODELS)
def test_kv_bytes_equal_the_cache_arrays(name):
  model = model_config(name)
  for context in (1, 7, 300):
    nbytes = sum(a.nbytes for a in _reference_cache(model, context))
    assert attention.kv_bytes_per_token(model) * context == nbytes
    assert attention.attention_bytes(model, context, 1) == nbytes


@pytest.mark.parametrize("name", MODELS)
def test_flops_equal_token_by_token_count(name):
  model = model_config(name)
  rng = np.random.default_rng(0)
  new = rng.integers(1, 40, 12)
  context = new + rng.integers(0, 200, 12)
  got = attention.attention_flops(model, context, new)
  want = [_reference_flops(model, int(c), int(n)) for c, n in zip(context, new)]
  np.testing.assert_array_equal(got, want)
  # a whole prompt at once costs what its chunks cost one after the other (chunked prefill)
  whole = attention.attention_flops(model, 300, 300)
  chunks = sum(attention.attention_flops(model, c, 100) for c in (100, 200, 300))
  assert whole == chunks


def test_mla_cache_is_smaller_than_its_mha_approximation():
  ds = model_config("deepseek_v2_lite")
  mha = dataclasses.replace(ds, kv_lora_rank=0, qk_rope_head_dim=0)
  assert attention.kv_bytes_per_token(ds) * 7 < attention.kv_bytes_per_token(mha)


def test_attention_time_is_the_roofline_of_summed_work():
  model = model_config("mixtral_8x7b")
  context, new = np.array([200, 500, 90]), np.array([1, 1, 90])
  b = attention.attention_bytes(model, context, new).sum()
  f = attention.attention_flops(model, context, new).sum()
  assert attention.attention_time(model, context, new, 1e12, 1e14) == max(b / 1e12, f / 1e14)
  # decode is bandwidth bound on an A100-like ratio, a long prefill chunk FLOP bound
  assert attention.attention_time(model, [4000], [1], 1.5e12, 3e14) == pytest.approx(
      attention.attention_bytes(model, 4000, 1) / 1.5e12)
  assert attention.attention_time(model, [4000], [4000], 1.5e12, 3e14) == pytest.approx(
      attention.attention_flops(model, 4000, 4000) / 3e14)


def test_dense_roofline_without_attention_is_the_cost_models_dense_time():
  model, cluster = model_config("olmoe_1b_7b"), cluster_config("edge_hetero_4")
  hw = cost_model._hardware(model, cluster, None)
  tokens = np.array([[3, 0, 5, 1], [0, 0, 0, 2], [9, 9, 9, 9]], float)
  zero = np.zeros_like(tokens)
  got = attention.dense_roofline(hw.dense_read, hw.dense_flop, tokens, zero, zero,
                                 cluster.mem_bandwidth, cluster.peak_flops)
  np.testing.assert_allclose(got, cost_model._dense_times(tokens, hw), rtol=1e-12)
  # attention only adds time, and only where the server has tokens
  more = attention.dense_roofline(hw.dense_read, hw.dense_flop, tokens, tokens * 1e9,
                                  tokens * 1e12, cluster.mem_bandwidth, cluster.peak_flops)
  assert np.all(more > got)


def test_kv_budget_is_memory_left_after_dense_and_experts():
  model, cluster = model_config("olmoe_1b_7b"), cluster_config("edge_hetero_4")
  held = np.array([10, 200, 0, 64])
  budget = attention.kv_budget_bytes(model, cluster, held)
  for n, s in enumerate(cluster.servers):
    assert budget[n] == s.memory_bytes - model.dense_bytes - held[n] * model.expert_bytes
  # one more expert on a server takes exactly one expert's bytes from its KV budget
  more = attention.kv_budget_bytes(model, cluster, held + np.eye(4, dtype=int)[1])
  assert budget[1] - more[1] == model.expert_bytes


def test_bad_lengths_and_overfull_servers_raise_one_line_errors():
  model, cluster = model_config("olmoe_1b_7b"), cluster_config("edge_hetero_4")
  with pytest.raises(attention.AttentionCostError, match="new <= context"):
    attention.attention_flops(model, [10], [11])
  with pytest.raises(attention.AttentionCostError, match="new <= context"):
    attention.attention_bytes(model, [10], [-1])
  with pytest.raises(attention.AttentionCostError, match="at least one prompt token"):
    attention.kv_reservation_bytes(model, 0, 128)
  too_many = np.full(4, 10**6)
  with pytest.raises(attention.AttentionCostError, match="place fewer experts"):
    attention.kv_budget_bytes(model, cluster, too_many)
  with pytest.raises(attention.AttentionCostError, match=r"\[N\] = \[4\]"):
    attention.kv_budget_bytes(model, cluster, np.zeros(3))
  # a server whose leftover holds less than one request of KV
  fill = np.floor((np.array([s.memory_bytes for s in cluster.servers]) - model.dense_bytes)
                  / model.expert_bytes).astype(int)
  with pytest.raises(attention.AttentionCostError, match="needs .* MiB"):
    attention.check_kv_fits(model, cluster, fill, 4096, 4096)
  ok = attention.check_kv_fits(model, cluster, fill - 50, 512, 128)
  assert np.all(ok >= attention.kv_reservation_bytes(model, 512, 128))


def test_step_attention_work_groups_tokens_by_step_and_request():
  model = model_config("mixtral_8x7b")
  # step 0: request 5 (server 1) prefills positions 0..9; request 2 (server 0) decodes at 40
  # step 1: request 5 decodes at 10, request 2 at 41, request 9 (server 1) prefills 0..3
  rows = [(0, 1, 5, p) for p in range(10)] + [(0, 0, 2, 40), (1, 1, 5, 10), (1, 0, 2, 41)] + \
      [(1, 1, 9, p) for p in range(4)]
  step, server, request, position = (np.array(c) for c in zip(*rows))
  order = np.random.default_rng(0).permutation(len(rows))  # token order does not matter
  b, f = attention.step_attention_work(model, step[order], server[order], request[order],
                                       position[order], 2, 3)
  want = np.zeros((2, 3, 2))
  for s, n, ctx, new in ((0, 1, 10, 10), (0, 0, 41, 1), (1, 1, 11, 1), (1, 0, 42, 1),
                         (1, 1, 4, 4)):
    want[s, n] += (attention.attention_bytes(model, ctx, new),
                   attention.attention_flops(model, ctx, new))
  np.testing.assert_array_equal(b, want[..., 0])
  np.testing.assert_array_equal(f, want[..., 1])
