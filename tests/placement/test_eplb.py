"""EPLB: the published README example, its invariants, and the placement baseline."""
import itertools

import numpy as np
import pytest

from _placement_cases import make_problem
from moe_edge.placement.eplb import (EplbOptions, balanced_packing, eplb, layer_slots,
                                     rebalance_experts,
                                     rebalance_experts_uneven, replicate_experts)
from moe_edge.placement.problem import PlacementError, PlacementProblem

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def check_plan(weight, phy2log, log2phy, logcnt, num_replicas):
  """Every expert at least once, counts and the inverse map consistent."""
  layers, experts = weight.shape
  assert phy2log.shape == (layers, num_replicas)
  for li in range(layers):
    np.testing.assert_array_equal(np.bincount(phy2log[li], minlength=experts), logcnt[li])
    for e in range(experts):
      slots = log2phy[li, e][log2phy[li, e] >= 0]
      assert len(slots) == logcnt[li, e]
      assert np.all(phy2log[li, slots] == e)
  assert logcnt.min() >= 1


def test_readme_example_exact():
  phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
  np.testing.assert_array_equal(phy2log, README_PHY2LOG)
  check_plan(README_WEIGHT, phy2log, log2phy, logcnt, 16)


def test_hierarchical_keeps_groups_on_nodes():
  rng = np.random.default_rng(0)
  weight = rng.integers(1, 200, (3, 16)).astype(float)
  phy2log, log2phy, logcnt = rebalance_experts(weight, 24, 4, 2, 4)
  check_plan(weight, phy2log, log2phy, logcnt, 24)
  group = phy2log // 4  # 4 experts per group; node = first or second half of the slots
  for li in range(3):
    first, second = set(group[li, :12]), set(group[li, 12:])
    assert len(first) == 2 and len(second) == 2 and not first & second


def test_global_policy_when_groups_do_not_divide_nodes():
  rng = np.random.default_rng(1)
  weight = rng.random((2, 10))
  phy2log, log2phy, logcnt = rebalance_experts(weight, 15, 5, 2, 5)  # 5 % 2 != 0: global
  check_plan(weight, phy2log, log2phy, logcnt, 15)
  same, _, _ = rebalance_experts(weight, 15, 1, 1, 5)
  np.testing.assert_array_equal(phy2log, same)


def test_replication_minimises_the_largest_load_per_replica():
  rng = np.random.default_rng(2)
  for _ in range(5):
    w = rng.integers(1, 50, (1, 4)).astype(float)
    _, _, cnt = replicate_experts(w, 9)
    best = min(max(w[0] / np.array(c)) for c in itertools.product(range(1, 7), repeat=4)
               if sum(c) == 9)
    assert np.isclose(max(w[0] / cnt[0]), best)


def test_balanced_packing_fills_packs_exactly():
  rng = np.random.default_rng(3)
  w = rng.random((4, 12))
  pack, rank = balanced_packing(w, 3)
  for row in range(4):
    np.testing.assert_array_equal(np.bincount(pack[row], minlength=3), [4, 4, 4])
    for p in range(3):
      assert sorted(rank[row, pack[row] == p]) == [0, 1, 2, 3]
  pack, rank = balanced_packing(w, 3, pack_size=np.array([2, 7, 3]))
  np.testing.assert_array_equal(np.bincount(pack[0], minlength=3), [2, 7, 3])
  # Greedy heaviest-first: the heaviest item goes to pack 0, the next to pack 1.
  order = np.argsort(-w[1], kind="stable")
  pack, _ = balanced_packing(w[1:2], 3)
  assert pack[0, order[0]] == 0 and pack[0, order[1]] == 1 and pack[0, order[2]] == 2


def test_uneven_slots():
  rng = np.random.default_rng(4)
  weight = rng.random((2, 6))
  slots = np.array([1, 4, 3])
  phy2log, log2phy, logcnt = rebalance_experts_uneven(weight, slots)
  check_plan(weight, phy2log, log2phy, logcnt, 8)


@pytest.mark.parametrize("args, match", [
    ((README_WEIGHT, 10, 4, 2, 8), "num_replicas=10 must be >= the 12"),
    ((README_WEIGHT, 18, 4, 2, 8), "multiple of num_gpus"),
    ((README_WEIGHT, 16, 5, 2, 8), "split evenly"),
    ((README_WEIGHT, 18, 4, 4, 6), "multiple of num_nodes"),
    ((-README_WEIGHT, 16, 4, 2, 8), "non-negative"),
    ((README_WEIGHT[0], 16, 4, 2, 8), "layers, experts"),
])
def test_bad_input(args, match):
  with pytest.raises(PlacementError, match=match):
    rebalance_experts(*args)


def test_eplb_placement_equal_slots():
  problem = make_problem(n=4, l=2, e=8, seed=0, copies=2.5)
  placement = eplb(problem)
  placement.validate(problem)
  s = int(min(problem.capacity.min() // 2, 8))
  assert placement.info["slots"].startswith("equal")
  assert placement.hosts.sum(axis=2).max() <= s  # the same slots per layer on every server
  # The hottest expert of each layer (total traffic) has the most replicas.
  load = problem.traffic.sum(axis=0)
  reps = placement.hosts.sum(axis=0)
  for li in range(2):
    assert reps[li, np.argmax(load[li])] == reps[li].max()


def test_layer_slots_spread_memory():
  for cap, l, e in [([7, 3, 2], 2, 6), ([5, 5, 5, 1], 3, 4), ([9, 0, 4], 4, 3)]:
    slots = layer_slots(np.array(cap), l, e)
    np.testing.assert_array_equal(slots.sum(axis=0), np.minimum(cap, l * e))
    assert slots.max() <= e
    assert np.ptp(slots.sum(axis=1)) <= 1


def test_eplb_placement_uneven_slots():
  problem = make_problem(n=3, l=2, e=6, seed=0, copies=1.0)
  problem = PlacementProblem.build(problem.model, problem.cluster, problem.freq, problem.tokens,
                                   capacity=np.array([7, 3, 2]))  # per layer 3 + 1 + 1 < 6
  placement = eplb(problem)
  placement.validate(problem)
  assert placement.info["slots"].startswith("uneven")
  assert placement.info["num_replicas"] == 12  # all the memory, spread over the layers
  assert placement.hosts.sum() == 12 - placement.info["collapsed"]
  with pytest.raises(PlacementError, match="max_slots_per_layer"):
    eplb(problem, EplbOptions(max_slots_per_layer=1))
