"""The exchange local search of DanceMoE (moe_edge/placement/exchange.py)."""
import numpy as np
import pytest

from _placement_cases import CASES, balanced_lam, make_problem
from moe_edge.placement import place
from moe_edge.placement.exchange import _Columns, _round, exchange_search
from moe_edge.placement.objective import objective
from moe_edge.placement.problem import link_time_per_token


def nearest_comm(problem, hosts) -> float:
  """The communication term under nearest-copy routing, from scratch (no shared code)."""
  tau = link_time_per_token(problem.model, problem.cluster).copy()
  np.fill_diagonal(tau, 0.0)
  d = np.where(hosts[None], tau[:, :, None, None], np.inf).min(axis=1)  # [source, L, E]
  return float((problem.traffic * d).sum())


def columns(problem, hosts):
  n, l, e = problem.shape
  tau = link_time_per_token(problem.model, problem.cluster).copy()
  np.fill_diagonal(tau, 0.0)
  h_cn = np.ascontiguousarray(hosts.reshape(n, l * e).T)
  return h_cn, _Columns(h_cn, np.ascontiguousarray(problem.traffic.reshape(n, l * e).T), tau)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_round_gains_are_the_exact_change_of_nearest_copy_comm(case):
  problem = make_problem(**CASES[case])
  hosts = place("dancemoe", problem, exchange=False).hosts
  n, l, e = problem.shape
  h_cn, cols = columns(problem, hosts)
  room = problem.capacity - hosts.sum(axis=(1, 2))
  # Values of single changes, recomputed from scratch.
  base = nearest_comm(problem, hosts)
  for c in range(l * e):
    for s in range(n):
      other = hosts.copy()
      li, ei = divmod(c, e)
      other[s, li, ei] = not other[s, li, ei]
      if hosts[s, li, ei]:
        want = np.inf if hosts[:, li, ei].sum() == 1 else nearest_comm(problem, other) - base
        assert cols.drop[c, s] == pytest.approx(want, rel=1e-9, abs=1e-15)
        for a in range(n):
          if not hosts[a, li, ei]:
            moved = other.copy()
            moved[a, li, ei] = True
            assert cols.move[s, a, c] == pytest.approx(base - nearest_comm(problem, moved),
                                                       rel=1e-9, abs=1e-15)
      else:
        assert cols.add[c, s] == pytest.approx(base - nearest_comm(problem, other), rel=1e-9,
                                               abs=1e-15)
  # A round's chains touch disjoint columns, so its predicted gain is the exact change.
  for chain in _round(cols, room, 1e-15):
    trial = hosts.copy()
    for srv, c, on in chain:
      trial[srv, c // e, c % e] = on
    assert trial.sum(axis=0).min() >= 1
    assert np.all(trial.sum(axis=(1, 2)) <= problem.capacity)
    assert nearest_comm(problem, trial) < base


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("lam_kind", ["comm", "balanced"])
def test_never_raises_the_objective_and_stays_feasible(case, lam_kind):
  problem = make_problem(**CASES[case])
  lam = 1.0 if lam_kind == "comm" else balanced_lam(problem)
  before = place("dancemoe", problem, lam=lam, exchange=False)
  after = place("dancemoe", problem, lam=lam)
  after.validate(problem)
  assert objective(problem, after, lam) <= objective(problem, before, lam) * (1 + 1e-12)
  stats = after.info["exchange_stats"]
  assert stats["objective_after"] == pytest.approx(objective(problem, after, lam), rel=1e-12)


def test_closes_the_gap_the_greedy_leaves_to_the_ilp():
  """Two racks of four servers, memory for 1.5 copies: the greedy stops above the optimum
  (a pair of changes is needed), the exchange search gets within 1% on every instance."""
  gaps_greedy, gaps = [], []
  for seed in range(3):
    problem = make_problem(n=8, l=2, e=8, seed=10 + seed, copies=1.5, racks=True)
    opt = place("ilp", problem, time_limit=60.0).info["objective"]
    gaps_greedy.append(objective(problem, place("dancemoe", problem, exchange=False)) / opt - 1)
    gaps.append(objective(problem, place("dancemoe", problem)) / opt - 1)
  assert max(gaps) <= 0.01
  assert np.mean(gaps) < np.mean(gaps_greedy)


def test_without_replicas_copies_only_move():
  problem = make_problem(**CASES[2])
  p = place("dancemoe", problem, replicas=False)
  np.testing.assert_array_equal(p.hosts.sum(axis=0), 1)
  hosts, _, stats = exchange_search(problem, p.hosts, adds=False)
  np.testing.assert_array_equal(hosts.sum(axis=0), 1)


def test_large_instances_skip_it_and_say_so():
  problem = make_problem(**CASES[1])
  p = place("dancemoe", problem, exchange_max_size=10)
  assert "exchange_skipped" in p.info
  assert p == place("dancemoe", problem, exchange=False)
