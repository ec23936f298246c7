"""The annealing stage of best_known (``placement/anneal.py``): it finds a planted better
placement from a far start, keeps memory, hosting and local routing, is exact (its score is the
cost model's) and deterministic for a seed; bad options and a start over capacity are refused."""
import numpy as np
import pytest

from _placement_cases import CASES, make_problem
from test_search import _ctx, _planted, _state
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement
from moe_edge.placement import place, registry
from moe_edge.placement.anneal import AnnealOptions, anneal
from moe_edge.placement.search import SearchOptions, objective_score, placement_score


def _anneal(problem, placement, wl, seed, sweeps=30.0):
  st = _state(problem, placement, wl)
  stats = anneal(st, problem.capacity, lambda t: objective_score(t, wl),
                 AnnealOptions(sweeps=sweeps), np.random.default_rng(seed))
  return st, stats


def test_finds_a_planted_better_placement_from_a_far_start():
  problem, planted = _planted()
  wl = _ctx(problem).workload
  start = place("uniform_ep", problem)
  best = placement_score(problem, planted, problem.hardware, wl)
  assert placement_score(problem, start, problem.hardware, wl) > 1.2 * best
  st, stats = _anneal(problem, start, wl, seed=0, sweeps=400.0)
  assert stats["score"] <= best * (1 + 1e-9)
  np.testing.assert_array_equal(st.hosts, planted.hosts)


def test_keeps_the_constraints_is_exact_and_deterministic():
  problem = make_problem(**CASES[3])
  ctx = _ctx(problem)
  start = registry.place("eplb", problem, None, ctx)
  st, stats = _anneal(problem, start, ctx.workload, seed=3)
  assert stats["accepted"] > 0 and stats["score"] < stats["start_score"]
  assert np.all(st.hosts.sum(axis=(1, 2)) <= problem.capacity)
  got = Placement.from_hosts(st.hosts, problem.model, problem.cluster, route=st.route)
  got.validate(problem)                       # every expert hosted, held experts served locally
  assert np.isclose(stats["score"], placement_score(problem, got, problem.hardware,
                                                    ctx.workload), rtol=1e-12)
  again, stats2 = _anneal(problem, start, ctx.workload, seed=3)
  np.testing.assert_array_equal(again.hosts, st.hosts)
  np.testing.assert_array_equal(again.route, st.route)
  assert stats2 == stats


def test_best_known_anneals_and_is_never_worse_for_it():
  problem = make_problem(**CASES[2])
  best = registry.place("best_known", problem, None, _ctx(problem))
  a = best.info["anneal"]
  assert a["tried"] == 100 * problem.shape[1] * problem.shape[2]
  assert best.info["score"] <= a["start_score"] * (1 + 1e-12)


def test_bad_options_and_a_start_over_capacity_are_refused():
  with pytest.raises(PlacementError, match="sweeps"):
    AnnealOptions(sweeps=-1.0)
  with pytest.raises(PlacementError, match="t_end"):
    AnnealOptions(t_start=1e-8, t_end=1e-6)
  with pytest.raises(PlacementError, match="anneal_sweeps"):
    SearchOptions(anneal_sweeps=-1.0)
  problem = make_problem(**CASES[3])
  wl = _ctx(problem).workload
  full = np.ones(problem.shape, dtype=bool)
  st = _state(problem, Placement.from_hosts(full, problem.model, problem.cluster), wl)
  with pytest.raises(PlacementError, match="capacity"):
    anneal(st, problem.capacity, lambda t: objective_score(t, wl), AnnealOptions(),
           np.random.default_rng(0))
