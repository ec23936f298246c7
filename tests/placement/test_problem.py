"""The problem contract's errors, and the fast route table against problem.py's reference."""
import numpy as np
import pytest

from _placement_cases import make_problem, small_cluster, small_model
from moe_edge.config import cluster_config, model_config
from moe_edge.placement.problem import PlacementError, PlacementProblem, nearest_replica_route
from moe_edge.placement.routing import nearest_replica_route_fast


def _random_hosts(rng, n, l, e, density):
  hosts = rng.random((n, l, e)) < density
  missing = ~hosts.any(axis=0)
  hosts[rng.integers(0, n, size=missing.sum()), *np.nonzero(missing)] = True
  return hosts


@pytest.mark.parametrize("racks", [False, True])
@pytest.mark.parametrize("kind", ["float", "integer", "sparse", "default"])
def test_fast_route_equals_reference(racks, kind):
  rng = np.random.default_rng(7 + racks)
  n, l, e = 6, 3, 12
  model, cluster = small_model(l, e), small_cluster(n, racks)
  for density in (0.15, 0.4, 0.8):
    hosts = _random_hosts(rng, n, l, e, density)
    traffic = {"float": rng.random((n, l, e)),
               "integer": rng.integers(0, 4, (n, l, e)).astype(float),  # many exact ties
               "sparse": rng.random((n, l, e)) * (rng.random((n, l, e)) < 0.3),
               "default": None}[kind]
    for slack in (0.0, 0.1, 1.0):
      want = nearest_replica_route(hosts, model, cluster, traffic, slack)
      got = nearest_replica_route_fast(hosts, model, cluster, traffic, slack)
      np.testing.assert_array_equal(got, want)


def test_fast_route_on_preset_clusters():
  rng = np.random.default_rng(3)
  model = model_config("tiny")
  for name in ("edge_hetero_4", "edge_hetero_8", "homogeneous_4"):
    cluster = cluster_config(name)
    n = cluster.num_servers
    hosts = _random_hosts(rng, n, model.n_moe_layers, model.n_experts, 0.35)
    traffic = rng.random(hosts.shape)
    np.testing.assert_array_equal(nearest_replica_route_fast(hosts, model, cluster, traffic),
                                  nearest_replica_route(hosts, model, cluster, traffic))


def test_fast_route_errors():
  model, cluster = small_model(2, 4), small_cluster(3)
  hosts = np.ones((3, 2, 4), dtype=bool)
  hosts[:, 1, 2] = False
  with pytest.raises(PlacementError, match="expert 2 of layer 1 is hosted nowhere"):
    nearest_replica_route_fast(hosts, model, cluster)
  with pytest.raises(PlacementError, match="non-negative"):
    nearest_replica_route_fast(np.ones((3, 2, 4), bool), model, cluster, -np.ones((3, 2, 4)))


def test_cluster_too_small_is_a_placement_error():
  model, cluster = small_model(2, 6), small_cluster(3)
  freq = np.full((3, 2, 6), model.top_k / 6)
  with pytest.raises(PlacementError, match="falls short"):
    PlacementProblem.build(model, cluster, freq, capacity=np.array([3, 4, 4]))  # 11 < 12


def test_problem_shape_mismatch_is_a_placement_error():
  model, cluster = small_model(2, 6), small_cluster(3)
  with pytest.raises(PlacementError, match=r"\[N, L, E\] = \[3, 2, 6\]"):
    PlacementProblem.build(model, cluster, np.ones((3, 2, 5)), capacity=np.full(3, 6))


def test_seeded_problems_are_feasible_and_heterogeneous():
  for copies in (1.0, 1.5, 2.5):
    p = make_problem(n=4, l=2, e=8, seed=1, copies=copies)
    assert p.capacity.sum() >= 2 * 8
    assert len(set(p.capacity.tolist())) > 1
    np.testing.assert_allclose(p.freq.sum(axis=2), p.model.top_k)
