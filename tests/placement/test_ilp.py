"""The MILP: equal to brute force on a tiny instance, never worse than any heuristic."""
import itertools

import numpy as np
import pytest

from _placement_cases import balanced_lam, make_problem
from moe_edge.placement import place, registry
from moe_edge.placement.objective import objective
from moe_edge.placement.problem import PlacementError, PlacementProblem, link_time_per_token


def brute_force(problem, lam):
  """min over every feasible hosts array and every route table of the objective (plain loops)."""
  n, l, e = problem.shape
  traffic = problem.traffic
  tau = link_time_per_token(problem.model, problem.cluster)
  t = problem.model.expert_flops_per_token / problem.cluster.peak_flops
  best = np.inf
  for bits in itertools.product([False, True], repeat=n * l * e):
    hosts = np.array(bits).reshape(n, l, e)
    if np.any(hosts.sum(axis=(1, 2)) > problem.capacity) or np.any(hosts.sum(axis=0) == 0):
      continue
    flows = [(s, li, ei) for s in range(n) for li in range(l) for ei in range(e)]
    options = [[s] if hosts[s, li, ei] else list(np.flatnonzero(hosts[:, li, ei]))
               for s, li, ei in flows]
    for choice in itertools.product(*options):
      comm, load = 0.0, np.zeros((n, l))
      for (s, li, ei), m in zip(flows, choice):
        comm += traffic[s, li, ei] * tau[s, m]
        load[m, li] += traffic[s, li, ei]
      best = min(best, comm + lam * (load * t[:, None]).max(axis=0).sum())
  return best


@pytest.mark.parametrize("lam_kind", ["zero", "balanced"])
def test_equals_brute_force_on_a_tiny_instance(lam_kind):
  base = make_problem(n=3, l=1, e=3, seed=11, racks=True)
  problem = PlacementProblem.build(base.model, base.cluster, base.freq, base.tokens,
                                   capacity=np.array([2, 1, 2]))
  lam = 0.0 if lam_kind == "zero" else balanced_lam(problem)
  placement = place("ilp", problem, lam=lam, mip_rel_gap=1e-9)
  placement.validate(problem)
  want = brute_force(problem, lam)
  assert placement.info["status"] == "optimal"
  np.testing.assert_allclose(objective(problem, placement, lam), want, rtol=1e-9)
  np.testing.assert_allclose(placement.info["objective"], want, rtol=1e-9)
  np.testing.assert_allclose(placement.info["milp_objective"], want, rtol=1e-6)


@pytest.mark.parametrize("case", [dict(n=3, l=2, e=6, seed=0, copies=1.0),
                                  dict(n=3, l=2, e=6, seed=1, copies=1.5),
                                  dict(n=4, l=2, e=6, seed=2, copies=1.5, racks=True)])
@pytest.mark.parametrize("lam_kind", ["one", "balanced"])
def test_never_worse_than_any_heuristic(case, lam_kind):
  problem = make_problem(**case)
  lam = 1.0 if lam_kind == "one" else balanced_lam(problem)
  best = place("ilp", problem, lam=lam, mip_rel_gap=1e-9)
  best.validate(problem)
  info = best.info
  assert info["status"] == "optimal"
  assert info["bound"] <= info["objective"] * (1 + 1e-6)
  assert 0.0 <= info["gap"] <= 1e-6
  for method in registry.names():
    if method == "ilp":
      continue
    opts = dict(lam=lam) if method == "dancemoe" else {}
    other = place(method, problem, **opts)
    assert info["objective"] <= objective(problem, other, lam) * (1 + 1e-7), method


def test_refuses_large_instances_unless_forced():
  problem = make_problem(n=3, l=2, e=6, seed=0)
  with pytest.raises(PlacementError, match=r"N\*L\*E = 3\*2\*6 = 36 > max_size=20"):
    place("ilp", problem, max_size=20)
  forced = place("ilp", problem, max_size=20, force=True)
  forced.validate(problem)
  with pytest.raises(PlacementError, match="lam"):
    place("ilp", problem, lam=-1.0)
