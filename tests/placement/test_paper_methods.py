"""The paper's algorithm (prism) and the paper's baselines (redundance, smartmoe, eplb_hetero):
each one's defining behaviour, on instances where a wrong implementation gives another answer.
(Feasibility and determinism of every registered method: test_methods.py.)"""
import numpy as np
import pytest

from _placement_cases import CASES, make_problem, small_cluster, small_model
from moe_edge.config import ClusterConfig, ServerSpec, uniform_links
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import PlacementProblem
from moe_edge.placement import place, registry
from moe_edge.placement.eplb_hetero import EplbHeteroOptions, pack_by_time
from moe_edge.placement.objective import layer_loads
from moe_edge.placement.prism import PrismOptions, entropy_budgets, greedy_hosts, layer_entropy
from moe_edge.placement.redundance import RedundanceOptions


def test_roles():
  assert registry.role("prism") == "paper"
  for m in ("redundance", "smartmoe", "eplb_hetero"):
    assert registry.role(m) == "baseline"


@pytest.mark.parametrize("case", CASES)
def test_prism_budgets_sum_to_memory_and_cover_every_layer(case):
  problem = make_problem(**case)
  n, l, e = problem.shape
  b = entropy_budgets(problem.freq, problem.capacity)
  np.testing.assert_array_equal(b.sum(axis=1), np.minimum(problem.capacity, l * e))
  assert np.all(b.sum(axis=0) >= e) and np.all((b >= 0) & (b <= e))


def test_prism_budgets_follow_entropy():
  rng = np.random.default_rng(0)
  model = small_model(4, 16)
  cluster = small_cluster(3)
  skew = np.array([0.2, 0.6, 1.0, 1.4])  # layer l: Zipf exponent, so entropy falls with l
  law = 1.0 / np.arange(1, 17)[None, :] ** skew[:, None]
  freq = np.stack([2 * (law / law.sum(axis=1, keepdims=True))[:, rng.permutation(16)]
                   for _ in range(3)])
  problem = PlacementProblem.build(model, cluster, freq, capacity=np.array([54, 50, 40]))
  h = layer_entropy(problem.freq)
  assert np.all(np.diff(h, axis=1) < 0)
  b = entropy_budgets(problem.freq, problem.capacity)
  assert np.all(np.diff(b, axis=1) <= 0), b            # lower entropy, smaller budget
  assert np.all(b[:, 0] > b[:, -1])
  share = problem.capacity[:, None] * h / h.sum(axis=1, keepdims=True)
  assert np.all(np.abs(b - share) < 1.0)                # rounding only: no layer was short
  # each (server, layer) holds exactly its most activated experts when nothing is missing
  hosts = greedy_hosts(problem.freq, b)
  for s in range(3):
    for li in range(4):
      top = np.argsort(-problem.freq[s, li], kind="stable")[:b[s, li]]
      assert set(np.flatnonzero(hosts[s, li])) == set(top)


def test_prism_moves_shortfalls_from_high_capacity_servers():
  model = small_model(2, 4)
  cluster = small_cluster(2)
  peaked, flat = np.array([2.0, 0, 0, 0]), np.full(4, 0.5)
  freq = np.stack([np.stack([peaked, flat])] * 2)       # layer 0 entropy 0, layer 1 log 4
  problem = PlacementProblem.build(model, cluster, freq, capacity=np.array([6, 2]))
  b = entropy_budgets(problem.freq, problem.capacity)
  # proportional split: server 0 [2, 4], server 1 [0, 2]: layer 0 holds 2 < 4 experts; the
  # two slots come from the larger server's surplus layer, the small server is untouched
  np.testing.assert_array_equal(b, [[4, 2], [0, 2]])
  p = place("prism", problem)
  p.validate(problem)
  # both servers' layer-1 picks are experts 0 and 1 (flat, ties to the lower id): the repair
  # gives two duplicates away for the experts nobody holds
  assert p.info["repair_swaps"] == 2
  np.testing.assert_array_equal(p.replicas[1], [1, 1, 1, 1])


def test_prism_repair_swaps_a_duplicate_for_the_missing_expert():
  model = small_model(1, 4)
  cluster = small_cluster(2)
  f0 = np.array([1.0, 0.6, 0.3, 0.1])
  freq = np.stack([f0[None], f0[None]]) * 2 / f0.sum()  # both servers want experts 0 and 1
  problem = PlacementProblem.build(model, cluster, freq, tokens=np.array([1.0, 3.0]),
                                   capacity=np.array([2, 2]))
  p = place("prism", problem)
  p.validate(problem)
  assert p.info["repair_swaps"] == 2
  # the less-used duplicates (expert 1, then 0 where it costs least) gave way to 2 and 3
  np.testing.assert_array_equal(p.replicas, np.ones((1, 4)))
  assert p.hosts[1, 0, 0] and p.hosts[1, 0, 1]          # the busy server keeps its hot pair


def test_redundance_replicates_the_hottest_expert_first():
  problem = make_problem(n=3, l=2, e=6, seed=1, copies=1.5)
  base = place("uniform_ep", problem)
  p = place("redundance", problem)
  assert np.all(p.hosts >= base.hosts)                  # uniform copies kept
  load = problem.traffic.sum(axis=0)
  hot = np.unravel_index(np.argmax(load), load.shape)
  assert p.replicas[hot] >= 2
  assert p.hosts.sum() == min(problem.capacity.sum(), 3 * 12)
  one = place("redundance", problem, max_copies=1)
  assert one.hosts.sum() == base.hosts.sum()


def test_smartmoe_balances_a_planted_load_better_than_round_robin():
  model = small_model(1, 8)
  cluster = small_cluster(2)
  load = np.arange(8, 0, -1, dtype=np.float64)          # experts 0..7: loads 8..1
  freq = np.stack([load / load.sum() * 2] * 2)[:, None, :]
  problem = PlacementProblem.build(model, cluster, freq, capacity=np.array([4, 4]))
  sm, rr = place("smartmoe", problem), place("uniform_ep", problem)
  assert np.all(sm.replicas == 1)
  np.testing.assert_array_equal(sm.experts_per_server, [4, 4])
  sm_load, rr_load = (layer_loads(problem, p.route)[:, 0] for p in (sm, rr))
  assert sm_load.max() - sm_load.min() < rr_load.max() - rr_load.min()
  assert np.isclose(sm_load[0], sm_load[1])             # 8+5+4+1 = 7+6+3+2


def test_eplb_hetero_gives_the_faster_server_more_load():
  model = small_model(2, 8)
  servers = (ServerSpec("fast", 1e9, 80e12, 1e11), ServerSpec("slow", 1e9, 20e12, 1e11))
  bw, lat = uniform_links(2, 1e8, 1e-4)
  cluster = ClusterConfig("fast_slow", servers, bw, lat)
  rng = np.random.default_rng(3)
  f = rng.uniform(0.2, 1.0, (1, 2, 8))
  freq = np.concatenate([f, f]) * 2 / f.sum(axis=2, keepdims=True)
  problem = PlacementProblem.build(model, cluster, freq, capacity=np.array([12, 12]))
  het, hom = place("eplb_hetero", problem), place("eplb", problem)
  het_load = layer_loads(problem, het.route).sum(axis=1)
  hom_load = layer_loads(problem, hom.route).sum(axis=1)
  assert het_load[0] > 1.2 * het_load[1]
  assert het_load[0] / het_load[1] > 1.1 * hom_load[0] / hom_load[1]


def test_pack_by_time_equalises_finishing_time():
  load = np.array([4.0, 3.0, 2.0, 2.0, 1.0, 1.0])
  out = pack_by_time(load, np.array([3, 3]), np.array([1.0, 3.0]))
  packed = np.bincount(out, load, minlength=2)
  assert packed[0] > packed[1] and np.bincount(out).tolist() == [3, 3]
  with pytest.raises(PlacementError, match="physical experts"):
    pack_by_time(load, np.array([2, 2]), np.array([1.0, 1.0]))


@pytest.mark.parametrize("make", [lambda: PrismOptions(route_slack=-1.0),
                                  lambda: RedundanceOptions(max_copies=0),
                                  lambda: EplbHeteroOptions(speed="watts")])
def test_bad_options_are_refused(make):
  with pytest.raises(PlacementError):
    make()
