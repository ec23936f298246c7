"""Attention cost and KV memory: closed forms against token-by-token numpy references."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.cost import attention
from moe_edge.cost.model import CostModel
from moe_edge.core.problem import PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.placement import baselines

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


def _trace(rows, num_experts, num_servers, top_k, layers, seed=0):
  """A trace of tokens ``(step, server, request, position)`` with random expert choices."""
  rng = np.random.default_rng(seed)
  step, server, request, position = (np.array(c, np.int32) for c in zip(*rows))
  t = len(rows)
  ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)])
                  for _ in range(t)]).astype(np.int32)
  return ActivationTrace(expert_ids=ids, gate_weights=np.ones(ids.shape, np.float32),
                         server=server, request=request, position=position, step=step,
                         model="test", num_experts=num_experts, num_servers=num_servers)


def test_cost_model_adds_attention_to_the_dense_roofline():
  model = model_config("olmoe_1b_7b")
  cluster = cluster_config("edge_hetero_4")
  cost = CostModel.build(model, cluster)
  placement = baselines.uniform_ep(PlacementProblem.build(
      model, cluster, np.full((4, model.n_moe_layers, model.n_experts), 8 / 64)))
  # step 0: server 0 prefills request 0 (positions 0..299), server 2 decodes request 1 at 900
  # step 1: server 0 decodes request 0 at 300, server 3 prefills request 2 positions 64..127
  rows = [(0, 0, 0, p) for p in range(300)] + [(0, 2, 1, 900), (1, 0, 0, 300)] + \
      [(1, 3, 2, p) for p in range(64, 128)]
  trace = _trace(rows, model.n_experts, 4, model.top_k, model.n_moe_layers)
  plain = cost.evaluate(trace, placement)
  with_attn = cost.evaluate(trace, placement, attention=True)
  np.testing.assert_array_equal(plain.dispatch_time, with_attn.dispatch_time)
  mbw, peak = cluster.mem_bandwidth, cluster.peak_flops
  w_d, f_d = model.dense_bytes, model.dense_flops_per_token
  kv, fk = attention.kv_bytes_per_token(model), attention.flops_per_key(model)
  layers = model.n_layers

  def server_time(n, tokens, ctx_new):
    b = sum(kv * c for c, _ in ctx_new)
    f = sum(layers * fk * sum(p + 1 for p in range(c - k, c)) for c, k in ctx_new)
    return max((w_d + b) / mbw[n], (tokens * f_d + f) / peak[n])

  want = [max(server_time(0, 300, [(300, 300)]), server_time(2, 1, [(901, 1)])),
          max(server_time(0, 1, [(301, 1)]), server_time(3, 64, [(128, 64)]))]
  np.testing.assert_allclose(with_attn.dense_time, want, rtol=1e-12)
  assert np.all(with_attn.dense_time > plain.dense_time)
  np.testing.assert_allclose(with_attn.step_latency - plain.step_latency,
                             with_attn.dense_time - plain.dense_time, rtol=1e-12)


def test_cost_model_kv_tokens_shrink_with_every_expert_held():
  model, cluster = model_config("olmoe_1b_7b"), cluster_config("edge_hetero_4")
  cost = CostModel.build(model, cluster)
  problem = PlacementProblem.build(model, cluster,
                                   np.full((4, model.n_moe_layers, model.n_experts), 8 / 64))
  placement = baselines.uniform_ep(problem)
  got = cost.kv_tokens(placement)
  held = placement.experts_per_server
  for n, s in enumerate(cluster.servers):
    left = s.memory_bytes - model.dense_bytes - held[n] * model.expert_bytes
    assert got[n] == int(left // attention.kv_bytes_per_token(model))


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
