"""best_known's start from the facility-location LP (``search.lp_start``, ``lp_bound.rounded_hosts``):
a feasible placement, searched from after the start methods, reused by the lower bound."""
import dataclasses

import numpy as np
import pytest

from _placement_cases import make_problem
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import PlacementProblem
from moe_edge.cost import CostModel
from moe_edge.cost.request_latency import workload_batches
from moe_edge.placement import registry
from moe_edge.placement.bounds import compute_bound
from moe_edge.placement.lp_bound import lp_cells, lp_phase_bound, rounded_hosts
from moe_edge.placement.registry import PlacementContext
from moe_edge.placement.search import (BestKnownOptions, default_workload, lp_start,
                                       placement_score)


def _racked():
  """Six servers in two racks, bandwidth-bound links (as on edge_hetero_8), 1.2 copies."""
  p0 = make_problem(n=6, l=2, e=12, seed=1, copies=1.2, racks=True)
  slow = dataclasses.replace(p0.cluster, bandwidth=tuple(tuple(v / 100.0 for v in row)
                                                         for row in p0.cluster.bandwidth))
  problem = PlacementProblem.build(p0.model, slow, p0.freq, p0.tokens, capacity=p0.capacity)
  return problem, PlacementContext(seed=0, cost=CostModel.build(problem.model, slow),
                                   workload=default_workload(problem))


def test_rounded_hosts_are_feasible_and_keep_an_integral_solution():
  rng = np.random.default_rng(0)
  cap = np.array([5, 4, 7])
  h = rng.random((3, 2, 4))
  hosts = rounded_hosts(h, cap)
  assert hosts.sum(axis=0).min() >= 1 and np.all(hosts.sum(axis=(1, 2)) <= cap)
  integral = np.zeros((3, 2, 4))
  integral[0, :, :2] = integral[1, :, 2:] = integral[2, 0] = 1.0
  np.testing.assert_array_equal(rounded_hosts(integral, cap), integral > 0)
  with pytest.raises(PlacementError, match="cannot hold the 8 experts once"):
    rounded_hosts(h, np.array([3, 2, 2]))


def test_lp_start_is_a_valid_placement_and_its_lp_is_remembered():
  problem, ctx = _racked()
  fast = registry.place("latency_search", problem, None, ctx)
  start = lp_start(problem, ctx, fast)
  start.validate(problem)
  assert np.all(start.experts_per_server <= problem.capacity)
  b = workload_batches(ctx.workload)[0]
  x = b[:, None, None] * problem.freq
  hw = ctx.cost.hardware
  v1, s1 = lp_phase_bound(hw, x, problem.capacity, compute_bound(hw, x)[0], solution=True)
  v2, s2 = lp_phase_bound(hw, x, problem.capacity, compute_bound(hw, x)[0], solution=True)
  assert s1 is s2 and v1 == v2 and start.info["phase"] == "decode"


def test_best_known_searches_from_the_lp_start_only_when_asked():
  problem, ctx = _racked()
  on = registry.place("best_known", problem, dict(lp_start_max_cells=lp_cells(problem.shape),
                                                  restarts=0), ctx)
  off = registry.place("best_known", problem, dict(lp_start_max_cells=lp_cells(problem.shape)
                                                   - 1, restarts=0), ctx)
  runs_on, runs_off = ([r["start"] for r in p.info["runs"]] for p in (on, off))
  assert runs_on == runs_off + ["lp_start"]
  on.validate(problem)
  hw, wl = ctx.cost.hardware, ctx.workload
  lp_run = next(r for r in on.info["runs"] if r["start"] == "lp_start")
  assert placement_score(problem, on, hw, wl) <= lp_run["score"] * (1 + 1e-12)
  # the runs before it are untouched: same seeds, same results
  assert on.info["runs"][:-1] == off.info["runs"]


def test_a_negative_lp_start_limit_is_refused():
  with pytest.raises(PlacementError, match="lp_start_max_cells"):
    BestKnownOptions(lp_start_max_cells=-1)
