"""The latency search, best_known and the lower bound: exact incremental costs (against the
cost model), a planted better placement, determinism, constraints, and the bound below every
method and below the exhaustive optimum of a tiny instance."""
import itertools

import numpy as np
import pytest

from _placement_cases import CASES, make_problem, small_cluster, small_model
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost import CostModel
from moe_edge.cost.request_latency import request_latency, workload_batches
from moe_edge.placement import place, registry
from moe_edge.placement.bounds import latency_lower_bound
from moe_edge.placement.layer_state import LayerState, nearest_route
from moe_edge.placement.registry import PlacementContext, WorkloadSummary
from moe_edge.placement.search import (SearchOptions, candidates, default_workload,
                                       objective_score, placement_score)


def _ctx(problem, seed=0, rate=0.05):
  n = problem.shape[0]
  wl = WorkloadSummary(request_rate=np.full(n, rate), prompt_tokens=np.full(n, 64.0),
                       output_tokens=np.full(n, 32.0), decode_batch=np.full(n, 4.0),
                       prefill_tokens=np.full(n, 64.0))
  return PlacementContext(seed=seed, cost=CostModel.build(problem.model, problem.cluster),
                          workload=wl)


def _state(problem, placement, wl):
  return LayerState.build(problem.hardware, problem.freq, np.stack(workload_batches(wl)),
                          placement.hosts, placement.route)


def test_roles_and_registration():
  assert registry.role("latency_search") == "ours"
  assert registry.role("best_known") == "oracle"


@pytest.mark.parametrize("method", ["eplb", "latency_search"])
def test_layer_state_equals_the_cost_model(method):
  problem = make_problem(**CASES[2])
  ctx = _ctx(problem)
  p = registry.place(method, problem, None, ctx)
  st = _state(problem, p, ctx.workload)
  for i, (phase, batch) in enumerate(zip(("decode", "prefill"), workload_batches(ctx.workload))):
    rep = ctx.cost.expected(problem, p, batch, phase)
    assert np.isclose(st.step_times()[i], rep.latency, rtol=1e-12)
    np.testing.assert_allclose(st.time[i], rep.layer_time, rtol=1e-12)


def test_candidate_times_are_exact_and_screening_is_exact_for_compute():
  problem = make_problem(**CASES[3])
  ctx = _ctx(problem)
  st = _state(problem, place("uniform_ep", problem), ctx.workload)
  room = problem.capacity - st.hosts.sum(axis=(1, 2))
  c = candidates(st, room, st.x.sum(axis=0), np.random.default_rng(0), 4)
  assert c.lk.size > 0 and (c.e2 >= 0).any()
  pred = st.evaluate(c.lk, c.ek, c.hk, c.e2, c.h2)
  for i in np.random.default_rng(1).choice(c.lk.size, size=12, replace=False):
    trial = LayerState.build(problem.hardware, problem.freq, np.stack(
        workload_batches(ctx.workload)), st.hosts, st.route)
    cols = [(c.ek[i], c.hk[i])] + ([(c.e2[i], c.h2[i])] if c.e2[i] >= 0 else [])
    trial.apply(int(c.lk[i]), [e for e, _ in cols], [h for _, h in cols])
    np.testing.assert_allclose(trial.time[:, c.lk[i]], pred[:, i], rtol=1e-10)
    # the route after a change is a valid one: local where held, else to a holder
    layer = trial.route[:, c.lk[i]]
    held = trial.hosts[:, c.lk[i]]
    assert np.all(held[layer, np.arange(layer.shape[1])[None, :]])


def _planted():
  """3 servers, each serving only its own two experts of every layer; memory for exactly one
  copy of everything: the optimum holds every server's experts at home (no exchange)."""
  model = small_model(2, 6)
  cluster = small_cluster(3)
  freq = np.zeros((3, 2, 6))
  for s in range(3):
    freq[s, :, 2 * s:2 * s + 2] = 1.0
  problem = PlacementProblem.build(model, cluster, freq, capacity=np.array([4, 4, 4]))
  hosts = freq > 0
  planted = Placement.from_hosts(hosts, model, cluster, route=nearest_route(
      hosts.transpose(1, 2, 0).reshape(-1, 3), problem.hardware.route_cost()).reshape(
          2, 6, 3).transpose(2, 0, 1))
  return problem, planted


def test_finds_a_planted_better_placement():
  problem, planted = _planted()
  ctx = _ctx(problem)
  start = place("uniform_ep", problem)
  opts = SearchOptions(starts=("uniform_ep",))
  got = registry.place("latency_search", problem, opts, ctx)
  got.validate(problem)
  wl, hw = ctx.workload, ctx.cost.hardware
  best = placement_score(problem, planted, hw, wl)
  assert placement_score(problem, start, hw, wl) > 1.2 * best     # the start is far from it
  assert placement_score(problem, got, hw, wl) <= best * (1 + 1e-9)
  np.testing.assert_array_equal(got.hosts, planted.hosts)


def test_deterministic_for_a_seed_and_never_worse_than_its_start():
  problem = make_problem(**CASES[2])
  a = registry.place("latency_search", problem, None, _ctx(problem, seed=5))
  b = registry.place("latency_search", problem, None, _ctx(problem, seed=5))
  assert a == b and a.info == {**b.info, "time_s": a.info["time_s"]}
  assert a.info["score"] <= min(a.info["starts"].values())
  wl = _ctx(problem).workload
  assert np.isclose(a.info["score"], placement_score(problem, a, problem.hardware, wl))


def test_best_known_keeps_the_constraints_and_beats_the_fast_search():
  problem = make_problem(**CASES[3])
  ctx = _ctx(problem)
  fast = registry.place("latency_search", problem, None, ctx)
  best = registry.place("best_known", problem, None, ctx)
  best.validate(problem)
  assert np.all(best.experts_per_server <= problem.capacity)
  assert best.info["score"] <= fast.info["score"] * (1 + 1e-12)
  assert len(best.info["runs"]) > 1


@pytest.mark.parametrize("case", CASES[:4])
def test_lower_bound_is_below_every_method(case):
  problem = make_problem(**case)
  ctx = _ctx(problem)
  hw, wl = ctx.cost.hardware, ctx.workload
  scores = {m: placement_score(problem, registry.place(m, problem, None, ctx), hw, wl)
            for m in registry.names() if m not in ("ilp", "best_known")}
  best = min(scores.values())
  bound, dec, pre = latency_lower_bound(problem, hw, wl)
  assert 0 < bound <= best, (bound, scores)
  assert dec.dense > 0 and dec.compute > 0 and dec.exchange >= 0 and dec.compute_exact
  assert pre.step >= pre.dense + pre.compute


def test_lower_bound_is_below_the_exhaustive_optimum():
  model = small_model(2, 3)
  cluster = small_cluster(2, racks=True)
  rng = np.random.default_rng(4)
  freq = rng.dirichlet(np.ones(3), size=(2, 2)) * 2
  problem = PlacementProblem.build(model, cluster, freq, tokens=np.array([1.0, 2.0]),
                                   capacity=np.array([4, 3]))
  ctx = _ctx(problem, rate=0.2)
  hw, wl = ctx.cost.hardware, ctx.workload
  best = np.inf
  for bits in itertools.product((False, True), repeat=12):
    hosts = np.array(bits).reshape(2, 2, 3)
    if hosts.sum(axis=0).min() < 1 or np.any(hosts.sum(axis=(1, 2)) > problem.capacity):
      continue
    route = nearest_route(hosts.transpose(1, 2, 0).reshape(-1, 2), hw.route_cost())
    st = LayerState.build(hw, problem.freq, np.stack(workload_batches(wl)), hosts,
                          route.reshape(2, 3, 2).transpose(2, 0, 1))
    best = min(best, objective_score(st.step_times(), wl))
  bound, _, _ = latency_lower_bound(problem, hw, wl)
  found = registry.place("best_known", problem, None, ctx)
  assert bound <= best <= found.info["score"] * (1 + 1e-12)
  assert found.info["score"] <= best * 1.01             # the long search reaches the optimum


def test_default_workload_and_a_workload_of_another_cluster():
  problem = make_problem(**CASES[0])
  wl = default_workload(problem)
  assert request_latency(0.01, 0.1, wl).stable
  other = make_problem(**CASES[2])
  with pytest.raises(PlacementError, match="servers"):
    registry.place("latency_search", problem, None,
                   PlacementContext(workload=default_workload(other)))
  with pytest.raises(PlacementError, match="candidates"):
    SearchOptions(candidates=0)
  with pytest.raises(PlacementError, match="starts"):
    SearchOptions(starts=())


def test_a_diverging_workload_still_ranks_placements():
  problem = make_problem(**CASES[1])
  ctx = _ctx(problem, rate=1e3)                          # every queue diverges
  wl, hw = ctx.workload, ctx.cost.hardware
  slow, fast = place("uniform_ep", problem), registry.place("latency_search", problem, None, ctx)
  fast.validate(problem)
  assert not request_latency(*_state(problem, slow, wl).step_times(), wl).stable
  s_slow, s_fast = placement_score(problem, slow, hw, wl), placement_score(problem, fast, hw, wl)
  assert 1e6 < s_fast <= s_slow                          # the no-wait latency still orders them


def test_small_problems_search_a_wider_neighbourhood():
  """On a problem of at most ``small_size`` cells the neighbourhood may widen ``small_widen``
  times: never worse than without, and the rule is off above the size; bad values refused."""
  problem = make_problem(**CASES[2])
  ctx = _ctx(problem)
  size = int(np.prod(problem.shape))
  narrow = registry.place("latency_search", problem, SearchOptions(small_widen=0), ctx)
  wide = registry.place("latency_search", problem, SearchOptions(small_size=size), ctx)
  off = registry.place("latency_search", problem, SearchOptions(small_size=size - 1), ctx)
  assert wide.info["score"] < narrow.info["score"]          # CASES[2]: the wider one finds more
  assert off.hosts.tolist() == narrow.hosts.tolist()
  assert wide.info["runs"][0]["rounds"] > narrow.info["runs"][0]["rounds"]
  for bad in (dict(small_size=-1), dict(small_widen=1.5)):
    with pytest.raises(PlacementError, match="must be an integer"):
      SearchOptions(**bad)
