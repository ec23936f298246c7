"""The objective against a plain-loop reference of its formula."""
import numpy as np
import pytest

from _placement_cases import make_problem
from moe_edge.placement.objective import objective, objective_terms
from moe_edge.placement.problem import Placement, PlacementError


def random_placement(problem, rng):
  """Random valid hosts and a random valid route (any replica, not the nearest)."""
  n, l, e = problem.shape
  hosts = rng.random((n, l, e)) < 0.4
  hosts[rng.integers(0, n, (l, e)), np.arange(l)[:, None], np.arange(e)[None, :]] = True
  route = np.empty((n, l, e), dtype=np.int32)
  for s in range(n):
    for li in range(l):
      for ei in range(e):
        route[s, li, ei] = s if hosts[s, li, ei] else rng.choice(np.flatnonzero(hosts[:, li, ei]))
  return Placement.from_hosts(hosts, problem.model, problem.cluster, route=route)


def reference(problem, placement, lam):
  """The module docstring's formula with explicit loops."""
  n, l, e = problem.shape
  bw = np.array(problem.cluster.bandwidth, dtype=float)
  lat = np.array(problem.cluster.latency, dtype=float)
  b = problem.model.activation_bytes
  comm = compute = local = total = 0.0
  for li in range(l):
    load = np.zeros(n)
    for s in range(n):
      for ei in range(e):
        traffic = problem.tokens[s] * problem.freq[s, li, ei]
        m = placement.route[s, li, ei]
        if m != s:
          comm += traffic * 2 * (lat[s, m] + b / bw[s, m])
        else:
          local += traffic
        total += traffic
        load[m] += traffic
    compute += max(load[m] * problem.model.expert_flops_per_token
                   / problem.cluster.servers[m].peak_flops for m in range(n))
  return comm + lam * compute, comm, compute, local / total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.0, 1.0, 250.0])
def test_matches_loop_reference(seed, lam):
  problem = make_problem(n=4, l=3, e=5, seed=seed, racks=seed % 2 == 1)
  placement = random_placement(problem, np.random.default_rng(seed))
  terms = objective_terms(problem, placement, lam)
  want, comm, compute, coverage = reference(problem, placement, lam)
  np.testing.assert_allclose([terms["objective"], terms["comm"], terms["compute"],
                              terms["coverage"]], [want, comm, compute, coverage], rtol=1e-12)
  assert objective(problem, placement, lam) == terms["objective"]
  np.testing.assert_allclose(terms["remote_traffic"],
                             problem.traffic.sum() * (1 - coverage), rtol=1e-9)


def test_everything_local_has_no_comm():
  problem = make_problem(n=3, l=2, e=4, seed=5, copies=3.0)
  hosts = np.ones(problem.shape, dtype=bool)
  placement = Placement.from_hosts(hosts, problem.model, problem.cluster)
  terms = objective_terms(problem, placement)
  assert terms["comm"] == 0.0 and terms["coverage"] == 1.0
  t = problem.model.expert_flops_per_token / problem.cluster.peak_flops
  own = problem.traffic.sum(axis=2)  # [N, L]: each server computes its own traffic
  np.testing.assert_allclose(terms["compute"], (own * t[:, None]).max(axis=0).sum())


def test_bad_input():
  problem = make_problem(n=3, l=2, e=4, seed=0)
  placement = random_placement(problem, np.random.default_rng(0))
  with pytest.raises(PlacementError, match="lam"):
    objective(problem, placement, lam=-1.0)
  other = make_problem(n=3, l=2, e=5, seed=0)
  with pytest.raises(PlacementError, match=r"\[N, L, E\]"):
    objective(other, placement)
