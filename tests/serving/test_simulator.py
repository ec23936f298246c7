"""The request-level simulator and the step cost: the step cost equals CostModel.evaluate on the
one-step trace; sampled routing reproduces the measured inclusion frequencies; a 256-server
cluster runs; a diverging queue is reported; bad input is refused. (Simulator = engine on the
same requests is tested in test_engine.py, where the engine runs.)"""
import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.core.problem import Placement
from moe_edge.cost.model import bytes_matrix
from moe_edge.serving.loop import QueueDivergesError
from moe_edge.serving.scheduler import SchedulerOptions
from moe_edge.serving.simulator import SampledRouting, SimulatorError, simulate
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import make_requests
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
  ids = r.batch(np.array([0, 1]), np.array([20000, 20000]))             # [T, L, k]
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
  with pytest.raises(SimulatorError, match="domain.*'legal'.*draw the requests from those"):
    SampledRouting(stats, ["github", "legal"])
  mixtral = model_config("mixtral_8x7b")
  with pytest.raises(SimulatorError, match="model 'mixtral_8x7b' has 32, 8, 2"):
    simulate(reqs, _uniform(mixtral, cl), StepCost(mixtral, cl), opts, routing)
