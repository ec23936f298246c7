"""The request-level simulator and the step cost: the step cost equals CostModel.evaluate (with
attention at 3 and 12 servers); sampled routing reproduces the measured inclusion frequencies;
records follow the scheduler and bytes are exact; a controller migrates; a 256-server cluster
runs; a diverging queue is reported; bad input is refused. (Simulator = engine on the same
requests is tested in test_engine.py, where the engine runs.)"""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.model import CostModel, bytes_matrix
from moe_edge.placement import registry
from moe_edge.serving.loop import QueueDivergesError
from moe_edge.serving.scheduler import SchedulerError, SchedulerOptions
from moe_edge.serving.simulator import (SampledRouting, SimulatorError, simulate,
                                        top_k_sample)
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import Requests, make_requests
from moe_edge.workload.standin import routing_stats_for
from moe_edge.workload.stats_traces import load_routing_stats

OLMOE = model_config("olmoe_1b_7b")


def _uniform(cfg, cluster):
  n, l, e = cluster.num_servers, cfg.n_moe_layers, cfg.n_experts
  hosts = np.zeros((n, l, e), bool)
  hosts[np.arange(e) % n, :, np.arange(e)] = True
  return Placement.from_hosts(hosts, cfg, cluster)


@pytest.mark.parametrize("name, cluster", [("olmoe_1b_7b", "edge_hetero_4"),
                                           ("mixtral_8x7b", "edge_hetero_8")])
def test_step_cost_equals_cost_model(name, cluster):
  cfg, cl = model_config(name), cluster_config(cluster)
  n, l, e, k = cl.num_servers, cfg.n_moe_layers, cfg.n_experts, cfg.top_k
  rng = np.random.default_rng(0)
  hosts = rng.random((n, l, e)) < 0.4
  hosts[rng.integers(n, size=(l, e)), np.arange(l)[:, None], np.arange(e)[None]] = True
  p = Placement.from_hosts(hosts, cfg, cl)
  sc = StepCost(cfg, cl)
  for t in (1, 7, 300):
    ids = np.argsort(rng.random((t, l, e)), axis=-1)[..., :k].astype(np.int32)
    srv = rng.integers(0, n - 1, t).astype(np.int32)  # the last server idle
    seconds, nbytes = sc.step(ids, srv, p)
    tr = sc.trace(ids, srv)
    np.testing.assert_allclose(seconds, sc.cost.evaluate(tr, p).step_latency[0], rtol=1e-12)
    assert nbytes == 2 * int(bytes_matrix(tr, p, cfg.activation_bytes).sum()) > 0


def test_sampled_routing_matches_measured_inclusion():
  stats = load_routing_stats("olmoe_1b_7b")
  r = SampledRouting(stats, ["github"] * 2, seed=1, pool=4096)  # pool noise < atol / 4
  ids = r.sample(np.repeat(np.arange(2), 20000), np.tile(np.arange(20000), 2))  # [T, L, k]
  assert ids.shape == (40000, OLMOE.n_moe_layers, OLMOE.top_k)
  assert all(len(set(row)) == OLMOE.top_k for row in ids[:50, 0])       # k distinct experts
  d = stats.domains.index("github")
  for j, layer in enumerate(stats.layers):
    freq = np.bincount(ids[:, layer].ravel(), minlength=OLMOE.n_experts) / len(ids)
    np.testing.assert_allclose(freq, stats.inclusion()[d, j], atol=0.03)


def test_simulate_runs_and_256_servers_run():
  cl = cluster_config("homogeneous_4", num_servers=3, link_gbps=0.5)
  opts = SchedulerOptions(max_batch=4, token_budget=256, prefill_chunk=256, kv_tokens=4 * 4096)
  reqs = make_requests(3, (64, 128), 16, seed=0, rate=0.5, duration_s=20.0,
                       home_domains=("github", "arxiv", "wikipedia"))
  routing = SampledRouting(load_routing_stats("olmoe_1b_7b"), reqs.domain, seed=0, pool=64)
  res = simulate(reqs, _uniform(OLMOE, cl), StepCost(OLMOE, cl), opts, routing)
  assert len(res.loop.requests) == len(reqs)
  assert sum(sum(s.decode_tokens) for s in res.loop.steps) == (reqs.output_tokens - 1).sum()
  assert all(s.cross_bytes > 0 for s in res.loop.steps)
  big = cluster_config("homogeneous_4", num_servers=256)
  reqs = make_requests(256, 8, 3, seed=0, requests_per_server=1)
  routing = SampledRouting(load_routing_stats("olmoe_1b_7b"), reqs.domain, seed=0, pool=16)
  res = simulate(reqs, _uniform(OLMOE, big), StepCost(OLMOE, big), opts, routing)
  assert len(res.loop.requests) == 256 and len(res.loop.steps) == 3


def test_diverging_queue_and_bad_input_are_reported():
  cl = cluster_config("homogeneous_4", num_servers=3)
  opts = SchedulerOptions(max_batch=1, token_budget=64, prefill_chunk=64, kv_tokens=4096)
  reqs = make_requests(3, 64, 32, seed=0, rate=1000.0, duration_s=1.0)
  stats = load_routing_stats("olmoe_1b_7b")
  routing = SampledRouting(stats, reqs.domain, seed=0, pool=16)
  with pytest.raises(QueueDivergesError, match="the queue diverges; lower the rate"):
    simulate(reqs, _uniform(OLMOE, cl), StepCost(OLMOE, cl), opts, routing, max_waiting=50)
  with pytest.raises(SimulatorError, match="kv_tokens='free'; use None, 'placement'"):
    simulate(reqs, _uniform(OLMOE, cl), StepCost(OLMOE, cl), opts, routing, kv_tokens="free")
  with pytest.raises(SimulatorError, match="domain.*'legal'.*draw the requests from those"):
    SampledRouting(stats, ["github", "legal"])
  mixtral = model_config("mixtral_8x7b")
  with pytest.raises(SimulatorError, match="model 'mixtral_8x7b' has 32, 8, 2"):
    simulate(reqs, _uniform(mixtral, cl), StepCost(mixtral, cl), opts, routing)


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
  ids = top_k_sample(np.log(np.full((t, model.n_moe_layers, model.n_experts), 1.0,
                                                np.float32)), model.top_k, rng)
  seconds, remote = StepCost.of(cost, attention=True).steps(placement, step, server, ids,
                                                            steps, request, position)
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
  res = simulate(req, placement, cost, opts, SampledRouting(stats, req.domain, 3),
                 kv_tokens="placement")
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
  again = simulate(req, placement, cost, opts, SampledRouting(stats, req.domain, 3),
                 kv_tokens="placement")
  assert again.requests == res.requests and again.steps == res.steps


def test_look_ahead_equals_step_by_step(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  req = _requests(3, 10, np.random.default_rng(2))
  opts = SchedulerOptions(max_batch=4, token_budget=64, prefill_chunk=32)
  batched = simulate(req, placement, cost, opts, SampledRouting(stats, req.domain, 5),
                     kv_tokens="placement")
  single = simulate(req, placement, cost, opts, SampledRouting(stats, req.domain, 5),
                    kv_tokens="placement", lookahead=1)
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

  res = simulate(req, first, cost, opts, SampledRouting(stats, req.domain, 0),
                 kv_tokens="placement", controller=controller, check_every_s=10.0, bin_s=5.0)
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
  with pytest.raises(QueueDivergesError, match="queue diverges") as e:
    simulate(req, placement, cost, SchedulerOptions(), SampledRouting(stats, req.domain),
             max_waiting=50, kv_tokens="placement")
  assert "\n" not in str(e.value)


def test_domain_the_statistics_lack_is_a_one_line_error(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  sub = dataclasses.replace(stats, domains=tuple(f"x{i}" for i in range(len(stats.domains))))
  req = _requests(3, 3, np.random.default_rng(0))
  with pytest.raises(SimulatorError, match="domain.*'github'.*draw the requests") as e:
    simulate(req, placement, cost, SchedulerOptions(), SampledRouting(sub, req.domain))
  assert "\n" not in str(e.value)


def test_request_longer_than_the_kv_budget_is_refused(setting):
  model, cluster, stats, cost, problem = setting
  placement = registry.place("uniform_ep", problem)
  req = Requests(server=np.zeros(1, np.int32), arrival_s=np.zeros(1), domain=("github",),
                 prompts=(np.zeros(150000, np.int32),), output_tokens=np.full(1, 4, np.int32))
  with pytest.raises(SchedulerError, match="KV budget"):
    simulate(req, placement, cost, SchedulerOptions(), SampledRouting(stats, req.domain),
             kv_tokens="placement")


def test_a_tokens_draw_depends_on_the_token_only(setting):
  """Counter-based draws: a token's experts are the same whichever tokens share its step, in
  whatever order; another position, request or seed draws anew; positions must be given."""
  model, cluster, stats, cost, problem = setting
  req = _requests(3, 4, np.random.default_rng(0))
  routing = SampledRouting(stats, req.domain, seed=7)
  request = np.repeat(np.arange(3), 50)
  position = np.tile(np.arange(50), 3)
  ids = np.sort(routing.sample(request, position), -1)
  order = np.random.default_rng(1).permutation(request.size)[:60]
  again = np.sort(SampledRouting(stats, req.domain, seed=7).sample(request[order],
                                                                    position[order]), -1)
  np.testing.assert_array_equal(again, ids[order])
  other = np.sort(SampledRouting(stats, req.domain, seed=8).sample(request, position), -1)
  assert (other != ids).any(axis=(1, 2)).mean() > 0.9
  shifted = np.sort(routing.sample(request, position + 1), -1)
  assert (shifted != ids).any(axis=(1, 2)).mean() > 0.9
  with pytest.raises(SimulatorError, match="one position per token"):
    routing.sample(request, position[:-1])


def test_pooled_routing_keeps_the_inclusion_frequencies(setting):
  model, cluster, stats, cost, problem = setting
  req = _requests(3, 4, np.random.default_rng(0))
  exact = SampledRouting(stats, req.domain, seed=0)
  pooled = SampledRouting(stats, req.domain, seed=0, pool=2048)
  r = np.zeros(6000, np.int64)                       # request 0: github
  for c in (exact, pooled):
    ids = c.sample(r, np.arange(r.size))
    assert ids.shape == (r.size, model.n_moe_layers, model.top_k)
    assert np.all(np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1])  # distinct
    freq = np.bincount(ids[:, 12].ravel(), minlength=64) / r.size
    want = stats.inclusion()[stats.domain_index("github"), 1]
    assert np.abs(freq - want).max() < 0.05
