"""The engine on 4 of the 8 host CPU devices with the tiny model: every generated token equals
the single-device cached model's, for a random placement with replicas and empty slots, across a
live migration and a failure drill between steps; every step's dispatch bytes equal the cost
model's for its routing; the simulator replaying the engine's routing forms the same steps; the
metrics files round-trip; bad input is refused."""
import jax
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import cluster_config, model_config
from moe_edge.model.transformer import MoETransformer
from moe_edge.parallel.mesh import server_mesh
from moe_edge.parallel.runtime import ServingRuntime
from moe_edge.placement.problem import Placement, PlacementProblem
from moe_edge.serving import metrics
from moe_edge.serving.engine import Engine, EngineError
from moe_edge.serving.report import single_device_tokens
from moe_edge.serving.scheduler import SchedulerError, SchedulerOptions
from moe_edge.serving.simulator import ReplayRouting, simulate
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import Requests, make_requests

CFG = model_config("tiny")
N = 4
L, E, K = CFG.n_moe_layers, CFG.n_experts, CFG.top_k
CLUSTER = cluster_config("homogeneous_4", num_servers=N)
OPTS = SchedulerOptions(max_batch=2, token_budget=10, prefill_chunk=8, kv_tokens=60)


@pytest.fixture(scope="module")
def model():
  return MoETransformer(CFG, nnx.Rngs(jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def mesh():
  return server_mesh(N)


def _placement(seed, dead=()):
  rng = np.random.default_rng(seed)
  hosts = rng.random((N, L, E)) < 0.4
  hosts[list(dead)] = False
  alive = [n for n in range(N) if n not in dead]
  hosts[rng.choice(alive, size=(L, E)), np.arange(L)[:, None], np.arange(E)[None]] = True
  return Placement.from_hosts(hosts, CFG, CLUSTER, num_slots=E)  # E slots: some stay empty


def _problem():
  return PlacementProblem.build(CFG, CLUSTER, np.full((N, L, E), K / E),
                                capacity=np.full(N, L * E))


def _engine(model, mesh, placement):
  rt = ServingRuntime(mesh, model, placement, problem=_problem(), num_slots=E)
  return Engine(rt, model, OPTS, cost=StepCost(CFG, CLUSTER)), rt


@pytest.fixture(scope="module")
def requests():
  return make_requests(N, (3, 17), (1, 9), seed=0, rate=200.0, requests_per_server=3)


@pytest.fixture(scope="module")
def want(model, requests):
  return single_device_tokens(model, requests)


def test_engine_equals_single_device_and_bytes_equal_cost_model(model, mesh, requests, want,
                                                                tmp_path):
  engine, rt = _engine(model, mesh, _placement(1))
  assert (rt.placement.slot_expert < 0).any() and (rt.placement.hosts.sum(0) > 1).any()
  res = engine.serve(requests, clock="virtual")
  for i, w in enumerate(want):
    np.testing.assert_array_equal(res.tokens[i], w, err_msg=f"request {i}")
  assert res.dispatch_bytes == res.cost_bytes and sum(res.dispatch_bytes) > 0
  steps, recs = res.loop.steps, res.loop.requests
  assert sum(sum(s.prefill_tokens) for s in steps) == requests.prompt_tokens.sum()
  assert sum(sum(s.decode_tokens) for s in steps) == (requests.output_tokens - 1).sum()
  for s in steps:  # the virtual clock: back-to-back steps of the cost model's time, or idle
    assert s.duration_s > 0 and max(np.add(s.prefill_tokens, s.decode_tokens)) <= 10
  for r in recs:
    assert r.arrival_s <= r.first_token_s <= r.finish_s
  # The simulator on the engine's routing, the same loop and step cost: step by step the same
  # steps, batches, bytes and times, exactly; planning ahead (its default) the same steps,
  # batches and bytes, the start times summed per batch (float rounding only).
  replay = ReplayRouting.from_engine(res.routing)
  assert simulate(requests, rt.placement, engine.cost, OPTS, replay, lookahead=1).loop == res.loop
  sim = simulate(requests, rt.placement, engine.cost, OPTS, replay).loop
  key = lambda s: (s.step, s.prefill_tokens, s.decode_tokens, s.cross_bytes)  # noqa: E731
  assert [key(s) for s in sim.steps] == [key(s) for s in steps]
  np.testing.assert_allclose([s.start_s for s in sim.steps], [s.start_s for s in steps],
                             rtol=1e-12)
  assert [(r.request, r.server) for r in sim.requests] == [(r.request, r.server) for r in recs]
  metrics.write_run(tmp_path, recs, steps, N, metrics.summarize(recs, steps))
  assert tuple(metrics.read_requests(tmp_path / "requests.csv")) == recs
  assert tuple(metrics.read_steps(tmp_path / "steps.csv")) == steps
  # Same requests, same scheduler: a wall-clock run forms the same batches when all arrive at 0.
  burst = Requests(requests.server, np.zeros(len(requests)), requests.domain,
                   requests.prompts, requests.output_tokens)
  virt, wall = engine.serve(burst, clock="virtual"), engine.serve(burst, clock="wall")
  assert [(s.prefill_tokens, s.decode_tokens) for s in virt.loop.steps] == [
      (s.prefill_tokens, s.decode_tokens) for s in wall.loop.steps]
  assert all(np.array_equal(a, b) for a, b in zip(wall.tokens, want))


def test_live_migration_and_failure_drill_between_steps(model, mesh, requests, want):
  engine, rt = _engine(model, mesh, _placement(2))
  target, events = _placement(3), []

  def between(step, now):
    if step == 3:
      events.append(rt.prepare_placement(target))  # copy; steps 3-4 run on the old placement
    elif step == 5:
      rt.commit(events[0].block())
      events.append("swap")

  res = engine.serve(requests, clock="virtual", between_steps=between)
  assert events[1:] == ["swap"] and np.array_equal(rt.placement.hosts, target.hosts)
  assert all(np.array_equal(a, b) for a, b in zip(res.tokens, want))
  assert res.dispatch_bytes == res.cost_bytes

  engine, rt = _engine(model, mesh, _placement(4))
  live = np.flatnonzero(requests.server != 3)
  sub = Requests(requests.server[live], requests.arrival_s[live],
                 tuple(requests.domain[i] for i in live),
                 tuple(requests.prompts[i] for i in live), requests.output_tokens[live])
  res = engine.serve(sub, clock="virtual",
                     between_steps=lambda step, now: rt.fail_server(3) if step == 2 else None)
  assert rt.failed_servers == (3,) and not rt.placement.hosts[3].any()
  assert all(np.array_equal(res.tokens[j], want[i]) for j, i in enumerate(live))
  assert res.dispatch_bytes == res.cost_bytes
  for r in res.routing[2:]:  # after the failure nothing is computed on server 3
    dest = rt.placement.route[r.server[:, None, None], np.arange(L)[None, :, None], r.expert_ids]
    assert (dest != 3).all()
  with pytest.raises(EngineError, match="server 3 has failed"):
    engine.serve(requests, clock="virtual")


def test_bad_input_is_refused(model, mesh, requests):
  engine, _ = _engine(model, mesh, _placement(1))
  long = make_requests(N, 60, 10, seed=0, requests_per_server=1)
  with pytest.raises(SchedulerError, match="request 0: prompt .60. \\+ output .10. = 70"):
    engine.serve(long, clock="virtual")
  small = Engine(engine.runtime, model, SchedulerOptions(max_batch=2, token_budget=10,
                                                         kv_tokens=8))
  with pytest.raises(SchedulerError, match="KV budget is 8; raise kv_tokens"):
    small.serve(requests)
  with pytest.raises(EngineError, match="needs a cost model"):
    small.serve(requests, clock="virtual")
  bad = Requests(requests.server, requests.arrival_s, requests.domain,
                 (requests.prompts[0] + 300,) + requests.prompts[1:], requests.output_tokens)
  with pytest.raises(EngineError, match="request 0 has token ids"):
    engine.serve(bad, clock="virtual")
