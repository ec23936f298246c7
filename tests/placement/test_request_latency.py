"""Expected request latency: the M/D/1 wait against a simulated queue, the gradient against
finite differences, the cost model's step times, and bad workloads."""
import numpy as np
import pytest

from _placement_cases import make_problem
from moe_edge.cost import CostModel
from moe_edge.core.errors import CostError
from moe_edge.cost.request_latency import (RequestLatencyError, expected_request_latency,
                                           latency_gradient, request_latency,
                                           workload_attention)
from moe_edge.serving.step_cost import StepCost
from moe_edge.placement import place
from moe_edge.placement.registry import WorkloadSummary


def _workload(n=2, rate=0.4, prompt=200.0, out=32.0, batch=4.0, chunk=100.0):
  f = lambda v: np.full(n, float(v))  # noqa: E731
  return WorkloadSummary(request_rate=f(rate) * np.arange(1, n + 1), prompt_tokens=f(prompt),
                         output_tokens=f(out), decode_batch=f(batch), prefill_tokens=f(chunk))


def _simulated_wait(rate: float, service: float, n: int = 200_000, seed: int = 0) -> float:
  """Mean wait of a simulated M/D/1 queue (Lindley's recursion)."""
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
  w = np.zeros(n)
  for i in range(1, n):
    w[i] = max(0.0, w[i - 1] + service - gaps[i])
  return float(w[n // 10:].mean())


def test_wait_matches_a_simulated_queue_and_parts_add_up():
  wl = _workload(n=1, rate=0.6)
  t_d, t_p = 0.05, 0.4
  lat = request_latency(t_d, t_p, wl)
  work = 200 / 100 * t_p + 32 * t_d / 4
  assert np.isclose(lat.utilisation[0], 0.6 * work)
  sim = _simulated_wait(0.6, work)
  assert abs(lat.wait[0] - sim) < 0.05 * sim
  assert np.isclose(lat.prefill[0], 2 * t_p) and np.isclose(lat.decode[0], 32 * t_d)
  assert np.isclose(lat.mean, lat.wait[0] + lat.prefill[0] + lat.decode[0])
  assert lat.stable


def test_mean_is_rate_weighted_and_increasing_in_both_steps():
  wl = _workload(n=2)
  lat = request_latency(0.05, 0.3, wl)
  assert np.isclose(lat.mean, (lat.per_server[0] + 2 * lat.per_server[1]) / 3)
  assert request_latency(0.06, 0.3, wl).mean > lat.mean
  assert request_latency(0.05, 0.31, wl).mean > lat.mean


def test_gradient_matches_finite_differences():
  wl = _workload(n=2)
  g = latency_gradient(0.05, 0.3, wl)
  h = 1e-7
  fd = [(request_latency(0.05 + h, 0.3, wl).mean - request_latency(0.05 - h, 0.3, wl).mean)
        / (2 * h),
        (request_latency(0.05, 0.3 + h, wl).mean - request_latency(0.05, 0.3 - h, wl).mean)
        / (2 * h)]
  np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_a_saturated_server_diverges():
  wl = _workload(n=2, rate=2.0)
  lat = request_latency(0.05, 0.4, wl)
  assert not lat.stable and lat.mean == np.inf and lat.wait[1] == np.inf
  assert latency_gradient(0.05, 0.4, wl) == (np.inf, np.inf)


def test_expected_request_latency_uses_the_cost_models_steps():
  problem = make_problem(n=3, l=2, e=6, seed=1)
  placement = place("eplb", problem)
  cost = CostModel.build(problem.model, problem.cluster)
  wl = _workload(n=3, rate=0.01)
  got = expected_request_latency(cost, problem, placement, wl)
  t_d = cost.expected(problem, placement, wl.decode_batch, "decode").latency
  t_p = cost.expected(problem, placement, wl.prefill_tokens, "prefill").latency
  assert got.decode_step == t_d and got.prefill_step == t_p
  assert got.mean == request_latency(t_d, t_p, wl).mean


@pytest.mark.parametrize("field,value,match", [
    ("decode_batch", 0.0, "decode_batch"), ("prefill_tokens", 0.0, "prefill_tokens"),
    ("request_rate", 0.0, "request_rate")])
def test_bad_workloads_are_refused(field, value, match):
  wl = _workload(n=2)
  kwargs = {f: getattr(wl, f) for f in ("request_rate", "prompt_tokens", "output_tokens",
                                        "decode_batch", "prefill_tokens")}
  kwargs[field] = np.full(2, value)
  with pytest.raises(RequestLatencyError, match=match):
    request_latency(0.05, 0.3, WorkloadSummary(**kwargs))


def test_negative_step_times_are_refused():
  with pytest.raises(RequestLatencyError, match="step times"):
    request_latency(-1.0, 0.3, _workload())


def _fed_tokens(problem, per_server: list[list[tuple[int, int]]], seed: int = 0):
  """Tokens of one step: server n's requests ``(context, new)`` each feed their ``new`` last
  positions; experts drawn at random (the attention increment does not depend on them)."""
  rng = np.random.default_rng(seed)
  server, request, position = [], [], []
  rid = 0
  for n, reqs in enumerate(per_server):
    for context, new in reqs:
      server += [n] * new
      request += [rid] * new
      position += list(range(context - new, context))
      rid += 1
  _, n_lay, n_exp = problem.shape
  ids = np.stack([rng.choice(n_exp, (n_lay, problem.model.top_k), replace=False)
                  for _ in server])
  return ids, np.array(server), np.array(request), np.array(position)


def test_attention_in_the_expected_step_equals_the_simulators():
  """The workload's mean decode and prefill steps pay the same attention seconds in
  CostModel.expected as the simulator's StepCost pays for a real step of those requests."""
  problem = make_problem(n=3, l=2, e=6)
  cost = CostModel.build(problem.model, problem.cluster)
  placement = place("dancemoe", problem)
  n = problem.shape[0]
  wl = WorkloadSummary(request_rate=np.full(n, 0.1), prompt_tokens=np.full(n, 3000.0),
                       output_tokens=np.full(n, 200.0), decode_batch=np.array([3.0, 1.0, 2.0]),
                       prefill_tokens=np.full(n, 3000.0))
  (dec_w, pre_w) = workload_attention(problem.model, wl)
  steps = {"decode": ([[(3100, 1)] * 3, [(3100, 1)], [(3100, 1)] * 2], wl.decode_batch, dec_w),
           "prefill": ([[(3000, 3000)]] * 3, wl.prefill_tokens, pre_w)}
  for phase, (reqs, batch, work) in steps.items():
    ids, server, request, position = _fed_tokens(problem, reqs)
    sim = [StepCost.of(cost, attention=a).step(ids, server, placement, request, position)[0]
           for a in (False, True)]
    exp = [cost.expected(problem, placement, batch, phase, attention=w).latency
           for w in (None, work)]
    assert sim[1] - sim[0] > 0
    np.testing.assert_allclose(exp[1] - exp[0], sim[1] - sim[0], rtol=1e-9)
  lat = expected_request_latency(cost, problem, placement, wl, attention=True)
  plain = expected_request_latency(cost, problem, placement, wl)
  assert lat.decode_step > plain.decode_step and lat.prefill_step > plain.prefill_step


def test_attention_work_of_the_wrong_shape_is_one_line():
  problem = make_problem(n=3, l=2, e=6)
  cost = CostModel.build(problem.model, problem.cluster)
  with pytest.raises(CostError, match=r"attention must be \(bytes \[N\], flops \[N\]\)"):
    cost.expected(problem, place("uniform_ep", problem), np.ones(3), "decode",
                  attention=(np.ones(2), np.ones(2)))
