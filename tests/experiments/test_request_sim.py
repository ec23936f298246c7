"""Request-level simulation: step costs equal the cost model's, records are consistent with the
scheduler, bytes are exact, divergence and bad domains are one-line errors."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.core.problem import PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.model import CostModel
from moe_edge.experiments import request_sim
from moe_edge.placement import registry
from moe_edge.serving.scheduler import SchedulerError, SchedulerOptions
from moe_edge.workload.requests import Requests
from moe_edge.workload.standin import routing_stats_for


def _setting(num_servers=3, link_gbps=0.5):
  model = model_config("deepseek_v2_lite")
  cluster = cluster_config("paper_testbed", memory_fraction=0.3, link_mbps=1e3 * link_gbps,
                           num_gpus=4 * num_servers // 3)
  stats, _ = routing_stats_for("deepseek_v2_lite")
  freq = np.full((cluster.num_servers, model.n_moe_layers, model.n_experts),
                 model.top_k / model.n_experts)
  problem = PlacementProblem.build(model, cluster, freq)
  return model, cluster, stats, CostModel.build(model, cluster), problem


def _requests(num_servers, n, rng, domains=("github", "arxiv", "wikipedia"), span=20.0):
  arrival = np.sort(rng.uniform(0, span, n))
  server = rng.integers(0, num_servers, n).astype(np.int32)
  return Requests(server=server, arrival_s=arrival,
                  domain=tuple(domains[i % len(domains)] for i in range(n)),
                  prompts=tuple(np.zeros(int(rng.integers(5, 40)), np.int32) for _ in range(n)),
                  output_tokens=rng.integers(1, 12, n).astype(np.int32))


@pytest.fixture(scope="module")
def setting():
  return _setting()


@pytest.mark.parametrize("num_servers", [3, 12])
def test_step_costs_equal_cost_model_evaluate(num_servers):
  model, cluster, stats, cost, problem = _setting(num_servers)
  placement = registry.place("dancemoe", problem)
  rng = np.random.default_rng(0)
  t, steps = 400, 7
  step = np.sort(rng.integers(0, steps, t)).astype(np.int32)
  server = rng.integers(0, cluster.num_servers, t).astype(np.int32)
  request = (server * 10 + rng.integers(0, 3, t)).astype(np.int32)
  position = rng.integers(0, 600, t).astype(np.int32)
  # one request's tokens of a step are contiguous positions ending at its context
  key = step.astype(np.int64) * 10**6 + request
  order = np.lexsort((position, key))
  step, server, request = step[order], server[order], request[order]
  _, first, inv = np.unique(key[order], return_index=True, return_inverse=True)
  position = (np.arange(t) - first[inv] + 100).astype(np.int32)
  ids = request_sim.top_k_sample(np.log(np.full((t, model.n_moe_layers, model.n_experts), 1.0,
                                                np.float32)), model.top_k, rng)
  seconds, remote = request_sim.step_costs(cost, placement, step, server, request, position,
                                           ids, steps)
  trace = ActivationTrace(expert_ids=ids, gate_weights=np.ones(ids.shape, np.float32),
                          server=server, request=request, position=position, step=step,
                          model=model.name, num_experts=model.n_experts,
                          num_servers=cluster.num_servers)
  rep = cost.evaluate(trace, placement, attention=True)
  np.testing.assert_allclose(seconds, rep.step_latency, rtol=1e-9)
  assert 2 * cost.hardware.act * remote.sum() == rep.cross_bytes


def test_simulation_records_follow_the_scheduler_and_bytes_are_exact(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("prism", problem)
  rng = np.random.default_rng(1)
  req = _requests(3, 24, rng)
  opts = SchedulerOptions(max_batch=4, token_budget=64, prefill_chunk=32)
  res = request_sim.simulate(req, placement, cost, stats, opts, seed=3)
  assert [r.request for r in res.requests] == list(range(len(req)))
  plen = req.prompt_tokens
  for r in res.requests:
    assert r.arrival_s <= r.first_token_s <= r.finish_s
    assert r.prompt_tokens == plen[r.request] and r.server == req.server[r.request]
  # steps tile time without overlap; tokens fed = every prompt plus every output but the last
  starts = np.array([s.start_s for s in res.steps])
  ends = starts + np.array([s.duration_s for s in res.steps])
  assert np.all(starts[1:] >= ends[:-1] - 1e-12)
  fed = sum(sum(s.prefill_tokens) + sum(s.decode_tokens) for s in res.steps)
  assert fed == plen.sum() + (req.output_tokens - 1).sum()
  assert all(max(s.prefill_tokens[n] + s.decode_tokens[n] for n in range(3)) <= 64
             for s in res.steps)
  # bytes: two activation vectors per remote token-choice, and the remote choices are the
  # complement of the local ones
  act = cost.hardware.act
  assert res.cross_bytes == 2 * act * (res.total_choices - res.local_choices)
  assert res.total_choices == fed * model.n_moe_layers * model.top_k
  # the look-ahead batching changes nothing but speed: same seed, same records
  again = request_sim.simulate(req, placement, cost, stats, opts, seed=3)
  assert again.requests == res.requests and again.steps == res.steps


def test_look_ahead_equals_step_by_step(setting, monkeypatch):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  req = _requests(3, 10, np.random.default_rng(2))
  opts = SchedulerOptions(max_batch=4, token_budget=64, prefill_chunk=32)
  batched = request_sim.simulate(req, placement, cost, stats, opts, seed=5)
  monkeypatch.setattr(request_sim, "MAX_LOOKAHEAD", 1)
  single = request_sim.simulate(req, placement, cost, stats, opts, seed=5)
  # the schedule is identical; routing draws differ in order, so times agree only in law:
  assert [s.prefill_tokens for s in single.steps][:3] == \
      [s.prefill_tokens for s in batched.steps][:3]
  assert len(single.requests) == len(batched.requests) == 10
  assert single.total_choices == batched.total_choices


def test_controller_swaps_placement_and_stalls(setting):
  model, cluster, stats, cost, problem = setting
  first = registry.place("uniform_ep", problem)
  second = registry.place("prism", problem)
  second = dataclasses.replace(second, info=dict(second.info, copies=7, note="swap"))
  req = _requests(3, 16, np.random.default_rng(4), span=30.0)
  opts = SchedulerOptions(max_batch=4, token_budget=64, prefill_chunk=32)
  calls = []

  def controller(t, window, current):
    calls.append((t, current))
    counts, tokens, steps = window.totals(0.0, t)
    assert counts.sum() == tokens.sum() * model.n_moe_layers * model.top_k
    if current is first:
      return second, 2.5
    return None, 0.0

  res = request_sim.simulate(req, first, cost, stats, opts, seed=0, controller=controller,
                             check_every_s=10.0, bin_s=5.0)
  assert len(res.migrations) == 1 and res.migrations[0].copies == 7
  m = res.migrations[0]
  assert m.time_s >= 10.0 and m.stall_s == 2.5
  # no step runs during the stall
  assert not any(m.time_s < s.start_s < m.time_s + 2.5 for s in res.steps)
  assert calls[1][1] is second


def test_diverging_queue_is_a_one_line_error(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  n = 200
  req = Requests(server=np.zeros(n, np.int32), arrival_s=np.linspace(0, 1, n),
                 domain=("github",) * n, prompts=tuple(np.zeros(400, np.int32) for _ in range(n)),
                 output_tokens=np.full(n, 128, np.int32))
  with pytest.raises(request_sim.QueueDivergesError, match="queue diverges") as e:
    request_sim.simulate(req, placement, cost, stats, SchedulerOptions(), max_waiting=50)
  assert "\n" not in str(e.value)


def test_domain_the_statistics_lack_is_a_one_line_error(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  sub = dataclasses.replace(stats, domains=tuple(f"x{i}" for i in range(len(stats.domains))))
  req = _requests(3, 3, np.random.default_rng(0))
  with pytest.raises(Exception, match="unknown domain 'github'") as e:
    request_sim.simulate(req, placement, cost, sub, SchedulerOptions())
  assert "\n" not in str(e.value)


def test_request_longer_than_the_kv_budget_is_refused(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  req = Requests(server=np.zeros(1, np.int32), arrival_s=np.zeros(1), domain=("github",),
                 prompts=(np.zeros(150000, np.int32),), output_tokens=np.full(1, 4, np.int32))
  with pytest.raises(SchedulerError, match="KV budget"):
    request_sim.simulate(req, placement, cost, stats, SchedulerOptions())


def test_pooled_routing_keeps_the_inclusion_frequencies(setting):
  model, cluster, stats, cost, problem = setting
  req = _requests(3, 4, np.random.default_rng(0))
  exact = request_sim._Costing(cost, stats, req, seed=0)
  pooled = request_sim._Costing(cost, stats, req, seed=0, pool=2048)
  r = np.zeros(6000, np.int64)                       # request 0: github
  for c in (exact, pooled):
    ids = c.sample(r)
    assert ids.shape == (r.size, model.n_moe_layers, model.top_k)
    assert np.all(np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1])  # distinct
    freq = np.bincount(ids[:, 12].ravel(), minlength=64) / r.size
    want = stats.inclusion()[stats.domain_index("github"), 1]
    assert np.abs(freq - want).max() < 0.05
