"""Every placement method: feasibility, determinism, and each method's defining property."""
import numpy as np
import pytest

from _placement_cases import CASES, make_problem, small_cluster
from moe_edge.config import ModelConfig
from moe_edge.placement import place, registry
from moe_edge.placement.dancemoe import layer_budgets
from moe_edge.placement.objective import objective
from moe_edge.placement.problem import PlacementError, PlacementProblem, link_time_per_token

HEURISTICS = [m for m in registry.names() if registry.role(m) != "oracle"]


@pytest.fixture(params=range(len(CASES)), ids=lambda i: f"case{i}")
def problem(request):
  return make_problem(**CASES[request.param])


@pytest.mark.parametrize("method", HEURISTICS)
def test_feasible_deterministic_and_annotated(problem, method):
  placement = place(method, problem, seed=3)
  placement.validate(problem)  # every expert hosted, capacity, route consistent, slot tables
  assert placement.method == method
  assert placement.hosts.sum(axis=0).min() >= 1
  assert np.all(placement.experts_per_server <= problem.capacity)
  again = place(method, problem, seed=3)
  assert again == placement
  info = placement.info
  assert info["time_s"] > 0
  assert np.isclose(info["objective"], objective(problem, placement, info["lam"]), rtol=1e-12)
  assert 0.0 <= info["coverage"] <= 1.0


def test_random_depends_on_the_seed_and_fills_memory(problem):
  a, b = place("random", problem, seed=0), place("random", problem, seed=1)
  assert not np.array_equal(a.hosts, b.hosts)
  n, l, e = problem.shape
  np.testing.assert_array_equal(a.experts_per_server, np.minimum(problem.capacity, l * e))


def test_uniform_ep_round_robin_without_replicas(problem):
  placement = place("uniform_ep", problem)
  assert np.all(placement.replicas == 1)
  n, l, e = problem.shape
  if placement.info["spilled"] == 0:
    for li in range(l):
      np.testing.assert_array_equal(np.argmax(placement.hosts[:, li, :], axis=0),
                                    np.arange(e) % n)
  loose = make_problem(n=4, l=2, e=8, seed=0, copies=4.0)
  placement = place("uniform_ep", loose)
  assert placement.info["spilled"] == 0
  assert np.all(placement.hosts[np.arange(8) % 4, :, np.arange(8)])


def test_topology_aware_places_each_expert_once_at_its_cheapest_server():
  problem = make_problem(n=4, l=2, e=6, seed=5, copies=4.0, racks=True)  # memory never binds
  placement = place("topology_aware", problem)
  assert np.all(placement.replicas == 1)
  tau = link_time_per_token(problem.model, problem.cluster)
  for li in range(2):
    for ei in range(6):
      cost = [sum(problem.traffic[m, li, ei] * tau[m, s] for m in range(4)) for s in range(4)]
      assert placement.hosts[int(np.argmin(cost)), li, ei]


def test_greedy_local_keeps_each_servers_hottest_experts(problem):
  placement = place("greedy_local", problem)
  t = problem.traffic.reshape(problem.shape[0], -1)
  hosts = placement.hosts.reshape(problem.shape[0], -1)
  replicated = placement.replicas.reshape(-1) >= 2
  for s in range(problem.shape[0]):
    kept = hosts[s] & replicated  # its own choices (sole copies may be coverage placements)
    if kept.any() and (~hosts[s]).any():
      assert t[s, kept].min() >= t[s, ~hosts[s]].max()
  # One eviction per expert that no server picked among its own capacity-many hottest.
  top = np.zeros_like(hosts)
  for s in range(problem.shape[0]):
    top[s, np.argsort(-t[s], kind="stable")[:problem.capacity[s]]] = True
  assert sum(placement.info["evictions_per_server"]) == np.sum(~top.any(axis=0))


def test_dancemoe_options(problem):
  once = place("dancemoe", problem, replicas=False)
  once.validate(problem)
  assert np.all(once.replicas == 1)
  for opts in (dict(entropy_budgets=False), dict(hetero_aware=False), dict(lam=0.0),
               dict(lam=1e3)):
    p = place("dancemoe", problem, **opts)
    p.validate(problem)
    for key, value in opts.items():
      assert p.info[key] == value
  with pytest.raises(PlacementError, match="lam"):
    place("dancemoe", problem, lam=-1.0)


def test_layer_budgets():
  rng = np.random.default_rng(0)
  n, l, e = 4, 5, 16
  freq = rng.random((n, l, e)) ** np.linspace(1, 12, l)[None, :, None]  # later layers skewed
  cap = np.array([5, 17, 40, 80])
  budget = layer_budgets(freq, cap)
  np.testing.assert_array_equal(budget.sum(axis=1), np.minimum(cap, l * e))
  assert budget.min() >= 1 and budget.max() <= e
  small = layer_budgets(freq, np.array([0, 3, 5, 200]))  # fewer slots than layers, or all
  np.testing.assert_array_equal(small.sum(axis=1), [0, 3, 5, l * e])
  assert small.min() >= 0 and np.all(small[3] == e)
  p = freq / freq.sum(axis=2, keepdims=True)
  eff = np.exp(-(p * np.log(p)).sum(axis=2))
  for s in range(1, n):  # a flatter layer never gets fewer slots than a more skewed one
    order = np.argsort(eff[s])
    assert np.all(np.diff(budget[s, order]) >= 0)


def olmoe_problem(copies=1.5):
  """Five servers, one per domain, with OLMoE-1B-7B's recorded routing counts (3 layers)."""
  data = np.load("/work/shared/data/routing_stats/olmoe_1b_7b_domain_counts.npz")
  counts = data["counts"].astype(np.float64)  # [domains, layers, experts]
  top_k = int(data["top_k"])
  freq = top_k * counts / counts.sum(axis=2, keepdims=True)
  n, l, e = freq.shape
  model = ModelConfig(name="olmoe_3_recorded_layers", vocab_size=50304, d_model=2048,
                      n_layers=l, n_heads=16, n_kv_heads=16, head_dim=128, n_experts=e,
                      top_k=top_k, d_ff_expert=1024, source="OLMoE-1B-7B shape, 3 layers")
  share = np.array([1.0, 1.0, 0.6, 1.4, 0.8])
  cap = np.floor(copies * l * e * share / share.sum()).astype(np.int64)
  return PlacementProblem.build(model, small_cluster(n), freq, capacity=cap)


def test_dancemoe_beats_uniform_ep_on_real_olmoe_counts():
  problem = olmoe_problem()
  dance, uniform = place("dancemoe", problem), place("uniform_ep", problem)
  dance.validate(problem)
  assert dance.info["coverage"] > uniform.info["coverage"] + 0.1
  assert dance.info["objective"] < uniform.info["objective"]


def test_unknown_method():
  with pytest.raises(PlacementError, match="known methods: dancemoe, dancemoe_refined, uniform_ep"):
    place("round_robin", make_problem())


@pytest.mark.parametrize("method", HEURISTICS + ["ilp"])
def test_single_server_and_saved_info(method, tmp_path):
  problem = make_problem(n=1, l=2, e=4, seed=0, copies=1.0)
  placement = place(method, problem)
  placement.validate(problem)
  assert placement.hosts.all()
  again = type(placement).load(placement.save(tmp_path / f"{method}.json"))
  assert again == placement and again.info == placement.info
