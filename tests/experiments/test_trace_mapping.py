"""Small-model traces mapped to larger expert counts: ids, ranges, group frequencies, gates."""
import numpy as np
import pytest

from moe_edge.config import model_config
from moe_edge.experiments.trace_mapping import (MappingError, expert_mapping, group_counts,
                                                map_trace)
from moe_edge.workload.traces import ActivationTrace


def small_trace(tokens=600, layers=4, experts=16, k=2, servers=4, seed=0) -> ActivationTrace:
  """Skewed random routing: distinct top-k per token and layer, renormalised gates."""
  rng = np.random.default_rng(seed)
  logits = rng.gumbel(size=(tokens, layers, experts)) - 0.3 * np.arange(experts)
  ids = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
  g = rng.random((tokens, layers, k)).astype(np.float32) + 0.1
  g /= g.sum(-1, keepdims=True)
  req_len = 20
  request = np.arange(tokens) // req_len
  return ActivationTrace(
      expert_ids=ids, gate_weights=g, server=(request % servers).astype(np.int32),
      request=request.astype(np.int32), position=(np.arange(tokens) % req_len).astype(np.int32),
      step=(request // servers).astype(np.int32), model="small_moe", num_experts=experts,
      num_servers=servers, source="test")


@pytest.mark.parametrize("target", ["deepseek_v2_lite", "qwen1_5_moe_a2_7b"])
def test_ids_distinct_in_range_and_group_frequencies_preserved(target):
  small = small_trace()
  model = model_config(target)
  mapped = map_trace(small, model, seed=3)
  l2, e2, k2 = model.n_moe_layers, model.n_experts, model.top_k
  assert mapped.expert_ids.shape == (small.num_tokens, l2, k2)
  assert mapped.num_experts == e2 and mapped.model == target
  assert mapped.expert_ids.min() >= 0 and mapped.expert_ids.max() < e2
  srt = np.sort(mapped.expert_ids, axis=-1)
  assert not np.any(srt[..., 1:] == srt[..., :-1])  # distinct choices
  # Token identity and time order are untouched.
  for key in ("server", "request", "position", "step"):
    np.testing.assert_array_equal(getattr(mapped, key), getattr(small, key))
  # Each small expert's group receives exactly picks-per-rank times its small counts.
  m = expert_mapping((4, 16, 2), (l2, e2, k2), seed=3)
  assert m.picks.sum() == k2 and np.all(m.picks == k2 // 2)
  got = group_counts(mapped, m)                                   # [L', E]
  for layer in range(l2):
    ref = np.bincount(small.expert_ids[:, layer % 4].ravel(), minlength=16) * (k2 // 2)
    np.testing.assert_array_equal(got[layer], ref)
  # Gates: each rank's gate is split evenly over its members, so per-token sums are kept.
  np.testing.assert_allclose(mapped.gate_weights.sum(-1),
                             small.gate_weights[:, np.arange(l2) % 4].sum(-1), rtol=1e-6)


def test_group_layout_and_layer_relabelling():
  m = expert_mapping((4, 16, 2), (24, 60, 4), seed=0)
  assert m.group_size.tolist() == [4] * 12 + [3] * 4 and m.group_size.sum() == 60
  assert m.group_start.tolist() == list(np.concatenate([[0], np.cumsum(m.group_size)[:-1]]))
  np.testing.assert_array_equal(m.layer_source, np.arange(24) % 4)
  for layer in range(24):
    assert sorted(m.layer_perm[layer]) == list(range(60))  # a permutation
    if layer < 4:
      np.testing.assert_array_equal(m.layer_perm[layer], np.arange(60))
  # Layers copying the same small layer are relabelled differently.
  assert not np.array_equal(m.layer_perm[4], m.layer_perm[8])


def test_members_spread_within_group_and_seed_matters():
  small = small_trace(tokens=4000)
  model = model_config("deepseek_v2_lite")
  a, b = map_trace(small, model, seed=0), map_trace(small, model, seed=0)
  np.testing.assert_array_equal(a.expert_ids, b.expert_ids)  # deterministic
  c = map_trace(small, model, seed=1)
  assert not np.array_equal(a.expert_ids, c.expert_ids)
  # Layer 0 (identity labels): group of small expert 0 is ids 0..3, 3 picks of 4 members each
  # time it is chosen, so every member gets 3/4 of its choices (uniform random subsets).
  n0 = int((small.expert_ids[:, 0] == 0).sum())
  per = np.bincount(a.expert_ids[:, 0].ravel(), minlength=64)[:4]
  assert per.sum() == 3 * n0
  np.testing.assert_allclose(per / n0, 0.75, atol=0.06)


def test_mapping_does_not_depend_on_row_order():
  small = small_trace()
  model = model_config("qwen1_5_moe_a2_7b")
  order = np.random.default_rng(0).permutation(small.num_tokens)
  mapped = map_trace(small, model, seed=2)
  shuffled = map_trace(small.select(order), model, seed=2)
  np.testing.assert_array_equal(shuffled.expert_ids, mapped.expert_ids[order])


def test_impossible_mappings_are_refused():
  with pytest.raises(MappingError, match="at least as many experts"):
    expert_mapping((4, 16, 2), (4, 8, 2))
  with pytest.raises(MappingError, match="distinct members"):
    expert_mapping((4, 16, 2), (4, 20, 6))  # groups of 1-2 members, 3 picks per rank
