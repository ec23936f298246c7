"""The proven lower bound (``placement/bounds.py``): below the exhaustive optimum of tiny random
instances (each phase and the request latency), below every registered method on a table-like
instance (real OLMoE routing statistics on edge_hetero_4, calibrated), and tighter than the
previous, uncoupled bound (``_old_bound.py``) on both."""
import dataclasses
import itertools

import numpy as np
import pytest

from _old_bound import old_latency_bound, old_phase_step
from _placement_cases import make_problem, small_cluster, small_model, zipf_freq
from moe_edge.config import cluster_config, model_config, with_expert_memory, with_grouped_kernel
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import PlacementProblem
from moe_edge.cost import CostModel
from moe_edge.cost.request_latency import request_latency, workload_batches
from moe_edge.experiments import calibration as calib
from moe_edge.placement import registry
from moe_edge.placement.bounds import (compute_bound, coupled_bound, latency_lower_bound,
                                       lp_cells, phase_bound)
from moe_edge.placement.lp_bound import _greedy_weights, lp_phase_bound
from moe_edge.placement.layer_state import LayerState, nearest_route
from moe_edge.placement.registry import PlacementContext, WorkloadSummary
from moe_edge.placement.search import placement_score
from moe_edge.workload.stats_traces import sample_stats_trace


def _workload(n, rate=0.05, batch=4.0, prefill=32.0):
  f = lambda v: np.full(n, float(v))  # noqa: E731
  return WorkloadSummary(request_rate=f(rate), prompt_tokens=f(prefill), output_tokens=f(32),
                         decode_batch=f(batch), prefill_tokens=f(prefill))


def _tiny(seed: int):
  """A random instance with 12 host bits (every placement is enumerable): 2 servers x 2 layers x
  3 experts, or 3 servers x 1 layer x 4 experts; random skew, tokens, memory and links."""
  rng = np.random.default_rng(seed)
  n, l, e = ((2, 2, 3), (3, 1, 4))[seed % 2]
  model = small_model(l, e)
  cluster = small_cluster(n, racks=bool(seed % 3 == 0))
  freq = zipf_freq(rng, n, l, e, model.top_k, skew=rng.uniform(0.5, 2.0))
  cap = rng.integers(1, l * e + 1, size=n)
  cap[0] = max(cap[0], l * e - cap[1:].sum())                    # room for every expert once
  problem = PlacementProblem.build(model, cluster, freq, tokens=rng.uniform(0.5, 2.0, n),
                                   capacity=cap)
  return problem, _workload(n, rate=0.1, batch=float(rng.integers(1, 9)),
                            prefill=float(rng.integers(8, 65)))


def _exhaustive(problem, wl):
  """``[T_d, T_p]`` minima and the least mean request latency over every feasible placement
  (local-first, nearest-copy routes)."""
  n, l, e = problem.shape
  hw = problem.hardware
  batches = np.stack(workload_batches(wl))
  steps, req = np.full(2, np.inf), np.inf
  for bits in itertools.product((False, True), repeat=n * l * e):
    hosts = np.array(bits).reshape(n, l, e)
    if hosts.sum(axis=0).min() < 1 or np.any(hosts.sum(axis=(1, 2)) > problem.capacity):
      continue
    route = nearest_route(hosts.transpose(1, 2, 0).reshape(-1, n), hw.route_cost())
    st = LayerState.build(hw, problem.freq, batches, hosts,
                          route.reshape(l, e, n).transpose(2, 0, 1))
    t = st.step_times()
    steps = np.minimum(steps, t)
    req = min(req, request_latency(float(t[0]), float(t[1]), wl).mean)
  return steps, req


@pytest.mark.parametrize("seed", range(8))
def test_below_the_exhaustive_optimum_and_above_the_old_bound(seed):
  problem, wl = _tiny(seed)
  hw = problem.hardware
  steps, req = _exhaustive(problem, wl)
  bound, dec, pre = latency_lower_bound(problem, hw, wl)
  tol = 1 + 1e-9
  assert dec.step <= steps[0] * tol and pre.step <= steps[1] * tol, (dec, pre, steps)
  assert bound <= req * tol
  old = [old_phase_step(hw, problem.freq, b, problem.capacity) for b in workload_batches(wl)]
  assert dec.step >= old[0] * (1 - 1e-9) and pre.step >= old[1] * (1 - 1e-9)
  assert bound >= old_latency_bound(problem, hw, wl) * (1 - 1e-9)


def test_strictly_tighter_than_the_old_bound_on_tiny_instances():
  gains = []
  for seed in range(8):
    problem, wl = _tiny(seed)
    gains.append(latency_lower_bound(problem, problem.hardware, wl)[0]
                 / old_latency_bound(problem, problem.hardware, wl))
  assert max(gains) > 1.05, gains


@pytest.fixture(scope="module")
def table_like():
  """OLMoE-1B-7B real routing statistics on edge_hetero_4 at 1 Gbps with 1.5 copies of expert
  memory and the tables' calibration (a smaller sample than the tables'), and its context."""
  base = cluster_config("edge_hetero_4", link_gbps=1.0)
  trace = sample_stats_trace("olmoe_1b_7b", 4, 1024, 0.8, 1, request_len=128)
  model = model_config("olmoe_1b_7b")
  cluster = with_expert_memory(base, model, 1.5)
  cal = calib.edge_calibration("h200_grouped", cluster, "olmoe_1b_7b")
  problem = PlacementProblem.from_trace(trace, model, cluster, calibration=cal)
  wl = _workload(4, batch=8.0, prefill=128.0)
  return problem, PlacementContext(seed=0, cost=CostModel.build(model, cluster, cal), workload=wl)


def test_below_every_method_on_a_table_like_instance(table_like):
  problem, ctx = table_like
  hw, wl = ctx.cost.hardware, ctx.workload
  batches = np.stack(workload_batches(wl))
  bound, dec, pre = latency_lower_bound(problem, hw, wl)
  for m in registry.names():
    if m in ("ilp", "best_known"):
      continue
    p = registry.place(m, problem, None, ctx)
    st = LayerState.build(hw, problem.freq, batches, p.hosts, p.route)
    t = st.step_times()
    assert dec.step <= t[0] and pre.step <= t[1], (m, dec.step, pre.step, t)
    assert bound <= placement_score(problem, p, hw, wl), m
  old = old_latency_bound(problem, hw, wl)
  assert bound > 1.05 * old, (bound, old)
  assert dec.compute_exact and dec.step > dec.dense + dec.compute


def test_coupled_bound_without_exchange_is_the_compute_bound():
  """One server holding everything: no exchange, the bound is the compute LP exactly."""
  problem = make_problem(n=3, l=2, e=6, seed=0, copies=1.0)
  hw = problem.hardware
  x = 2.0 * problem.freq[:1]
  one = dataclasses.replace(hw, **{f.name: getattr(hw, f.name)[(slice(0, 1),) * np.ndim(
      getattr(hw, f.name))] for f in dataclasses.fields(hw)
      if isinstance(getattr(hw, f.name), np.ndarray)})
  comp, _ = compute_bound(one, x)
  v = coupled_bound(one, x, np.array([12]), comp)
  assert np.isclose(v, comp.sum(), rtol=1e-9)


# ---- the facility-location LP (placement/lp_bound.py) ---------------------------------------
def test_greedy_weights_under_estimate_every_subset_and_are_tight_on_prefixes():
  rng = np.random.default_rng(0)
  for _ in range(20):
    xs = rng.exponential(1.0, 6) * (rng.random(6) > 0.2)
    w = _greedy_weights(xs)
    for bits in itertools.product((False, True), repeat=6):
      a = np.array(bits)
      assert w[a].sum() <= -np.expm1(-xs[a].sum()) + 1e-12
    assert np.allclose(np.cumsum(w), -np.expm1(-np.cumsum(xs)))


def _slow_links(cluster, factor: float = 100.0):
  """``cluster`` with every link ``factor`` times slower in bandwidth (bytes dominate)."""
  return dataclasses.replace(cluster, bandwidth=tuple(tuple(v / factor for v in row)
                                                      for row in cluster.bandwidth))


def _variant(seed: int, variant: str):
  """The tiny instance of ``seed``; ``dense_ffn``: on servers without a grouped kernel (dense
  over slots); ``slow_links``: bandwidth 100x lower, so bytes dominate the exchange."""
  problem, wl = _tiny(seed)
  if variant == "grouped":
    return problem, wl
  cluster = (with_grouped_kernel(problem.cluster, False) if variant == "dense_ffn"
             else _slow_links(problem.cluster))
  return PlacementProblem.build(problem.model, cluster, problem.freq, tokens=problem.tokens,
                                capacity=problem.capacity), wl


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("variant", ["grouped", "dense_ffn", "slow_links"])
def test_lp_below_the_exhaustive_optimum(seed, variant):
  problem, wl = _variant(seed, variant)
  hw = problem.hardware
  assert bool(hw.grouped.all()) is (variant != "dense_ffn")
  steps, req = _exhaustive(problem, wl)
  for p, b in enumerate(workload_batches(wl)):
    x = b[:, None, None] * problem.freq
    v = lp_phase_bound(hw, x, problem.capacity, compute_bound(hw, x)[0])
    assert np.isfinite(v) and v > 0
    assert hw.dense_time(b) + v <= steps[p] * (1 + 1e-9), (p, v, steps)
  bound, dec, pre = latency_lower_bound(problem, hw, wl, lp_max_cells=10 ** 6)
  assert bound <= req * (1 + 1e-9)
  assert bound >= latency_lower_bound(problem, hw, wl)[0] * (1 - 1e-12)


@pytest.mark.parametrize("variant", ["grouped", "slow_links"])
def test_lp_is_close_to_the_exhaustive_optimum_somewhere(variant):
  """Validity above is only a check if the LP comes near the optimum on some instances."""
  ratios = []
  for seed in range(8):
    problem, wl = _variant(seed, variant)
    hw = problem.hardware
    steps, _ = _exhaustive(problem, wl)
    b = workload_batches(wl)[0]
    x = b[:, None, None] * problem.freq
    v = lp_phase_bound(hw, x, problem.capacity, compute_bound(hw, x)[0])
    ratios.append((hw.dense_time(b) + v) / steps[0])
  assert max(ratios) > 0.97, ratios


def test_lp_is_tighter_than_the_coupled_bound_across_racks():
  """Two racks, half the bandwidth across, bytes dominating the exchange (as on edge_hetero_8),
  no rack holding a whole layer: the LP sees the forced cross-rack traffic and where each
  remote choice goes, which the coupled bound prices at the cheapest link."""
  p0 = make_problem(n=6, l=2, e=16, seed=0, copies=1.2, racks=True)
  problem = PlacementProblem.build(p0.model, _slow_links(p0.cluster), p0.freq, p0.tokens,
                                   capacity=p0.capacity)
  hw = problem.hardware
  b = np.full(6, 8.0)
  x = b[:, None, None] * problem.freq
  comp, _ = compute_bound(hw, x)
  lp = lp_phase_bound(hw, x, problem.capacity, comp)
  coupled = coupled_bound(hw, x, problem.capacity, comp)
  assert lp > 1.3 * coupled, (lp, coupled)
  dec = phase_bound(hw, problem.freq, b, problem.capacity, lp_max_cells=lp_cells(x.shape))
  assert dec.facility_lp and np.isclose(dec.step, hw.dense_time(b) + lp)
  off = phase_bound(hw, problem.freq, b, problem.capacity, lp_max_cells=lp_cells(x.shape) - 1)
  assert not off.facility_lp and off.step < dec.step


def test_lp_below_every_method_on_a_table_like_instance(table_like):
  problem, ctx = table_like
  hw, wl = ctx.cost.hardware, ctx.workload
  batches = np.stack(workload_batches(wl))
  _, dec, pre = latency_lower_bound(problem, hw, wl, lp_max_cells=10 ** 6)
  for m in ("latency_search", "prism", "eplb", "dancemoe"):
    p = registry.place(m, problem, None, ctx)
    t = LayerState.build(hw, problem.freq, batches, p.hosts, p.route).step_times()
    assert dec.step <= t[0] and pre.step <= t[1], (m, dec.step, pre.step, t)


def test_negative_lp_size_limit_is_refused(table_like):
  problem, ctx = table_like
  with pytest.raises(PlacementError, match="lp_max_cells must be >= 0"):
    latency_lower_bound(problem, ctx.cost.hardware, ctx.workload, lp_max_cells=-1)
