"""The serving runtime on 8 host CPU devices with the tiny model: outputs equal the single-device
model before, during and after a migration and after a server failure; traffic equals the cost
model's count; bad requests raise clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _parallel_util import E, K, L, MODEL, cluster, make_placement, scenario
from moe_edge.cost.model import bytes_matrix
from moe_edge.model.transformer import MoETransformer, expert_weights, generate
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.parallel.runtime import ServingError, ServingRuntime, UnreachableExpertError
from moe_edge.placement.problem import PlacementProblem
from moe_edge.workload.traces import ActivationTrace

N, S = 8, 8
ROWS = [2, 1, 0, 2, 1, 2, 2, 1]  # uneven per-server batches, server 2 idle
TOL = dict(rtol=1e-5, atol=1e-5)
ACT = MODEL.activation_bytes


@pytest.fixture(scope="module")
def model():
  return MoETransformer(MODEL, nnx.Rngs(jax.random.key(0, impl="rbg")))  # fast init on CPU


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.server_mesh(N)


@pytest.fixture(scope="module")
def requests():
  rng = np.random.default_rng(0)
  return [rng.integers(0, MODEL.vocab_size, (r, S)).astype(np.int32) for r in ROWS]


def problem(n=N):
  """Uniform statistics and room for every expert on every server."""
  return PlacementProblem.build(MODEL, cluster(n), np.full((n, L, E), K / E),
                                capacity=np.full(n, L * E))


_forward = nnx.jit(lambda m, t, r: m(t, routing=r))


def reference(model, per_server, routing=None):
  """Single-device logits and expert ids, split per server."""
  tokens = jnp.asarray(np.concatenate(per_server))
  r = None if routing is None else tuple(jnp.asarray(np.concatenate(a)) for a in routing)
  logits, aux = _forward(model, tokens, r)
  cuts = np.cumsum([len(a) for a in per_server])[:-1]
  return (np.split(np.asarray(logits), cuts), np.split(np.asarray(aux["expert_ids"]), cuts))


def assert_matches(res, want_logits, want_ids=None):
  for n, want in enumerate(want_logits):
    np.testing.assert_allclose(res.logits[n], want, **TOL)
    if want_ids is not None:
      np.testing.assert_array_equal(res.expert_ids[n], want_ids[n])


def trace_of(res) -> ActivationTrace:
  """The tokens of one step as an ActivationTrace (server = the server that served them)."""
  ids = np.concatenate([a.reshape(-1, L, K) for a in res.expert_ids])
  server = np.concatenate([np.full(a.shape[0] * a.shape[1], n) for n, a in
                           enumerate(res.expert_ids)]).astype(np.int32)
  t = ids.shape[0]
  return ActivationTrace(expert_ids=ids.astype(np.int32), gate_weights=np.ones(ids.shape,
                                                                             np.float32),
                         server=server, request=np.arange(t, dtype=np.int32),
                         position=np.zeros(t, np.int32), step=np.zeros(t, np.int32),
                         model=MODEL.name, num_experts=E, num_servers=N)


def host_send_counts(tables, res):
  """``[L, N, N]`` remote choices counted on the host from the routing the step returned."""
  packed, mask = mesh_lib.pack_rows([a.reshape(-1, L, K) for a in res.expert_ids])
  return np.stack([dispatch_lib.send_counts(tables, l, packed[:, l], mask) for l in range(L)])


def test_step_matches_single_device_and_cost_model(model, mesh, requests):
  p = scenario("replicas", N, np.random.default_rng(1))
  rt = ServingRuntime(mesh, model, p, problem=problem())
  res = rt.step(requests)
  want_logits, want_ids = reference(model, requests)
  assert_matches(res, want_logits, want_ids)
  assert res.logits[2].shape == (0, S, MODEL.vocab_size)
  np.testing.assert_array_equal(res.send_rows, host_send_counts(rt.tables, res))
  np.testing.assert_array_equal(res.dispatch_bytes(ACT), bytes_matrix(trace_of(res), p, ACT))
  assert res.send_rows.sum() > 0 and res.send_rows[:, 2].sum() == 0  # the idle server
  total = res.local_choices + res.remote_choices
  np.testing.assert_array_equal(total, np.broadcast_to(np.array(ROWS) * S * K, (L, N)))


def test_migration_before_during_after(model, mesh, requests):
  rng = np.random.default_rng(2)
  a, b = scenario("replicas", N, rng), scenario("random_route", N, rng)
  rt = ServingRuntime(mesh, model, a, problem=problem(), num_slots=E)
  want_logits, want_ids = reference(model, requests)
  assert_matches(rt.step(requests), want_logits, want_ids)

  pending = rt.prepare_placement(b)
  during = rt.step(requests)  # served between copy and swap: the old placement
  assert_matches(during, want_logits, want_ids)
  np.testing.assert_array_equal(rt.placement.hosts, a.hosts)
  np.testing.assert_array_equal(during.send_rows, host_send_counts(rt.tables, during))
  report = rt.commit(pending)
  after = rt.step(requests)
  assert_matches(after, want_logits, want_ids)
  np.testing.assert_array_equal(rt.placement.hosts, b.hosts)
  np.testing.assert_array_equal(rt.placement.route, b.route)
  np.testing.assert_array_equal(after.send_rows, host_send_counts(rt.tables, after))
  np.testing.assert_array_equal(after.dispatch_bytes(ACT),
                                bytes_matrix(trace_of(after), rt.placement, ACT))
  assert report.moves == int((b.hosts & ~a.hosts).sum()) > 0
  with pytest.raises(ServingError, match="prepare it again"):
    rt.commit(pending)  # stale: built on the placement before this one


def test_generation_with_a_migration_between_steps(model, mesh, requests):
  rng = np.random.default_rng(3)
  a, b = scenario("expert_parallel", N, rng), scenario("replicas", N, rng)
  rt = ServingRuntime(mesh, model, a, problem=problem(), num_slots=E)
  prompts = [r[:, :4] for r in requests]
  want = np.asarray(generate(model, jnp.asarray(np.concatenate(prompts)), 4))
  events, pending = [], []

  def on_step(t):
    if t == 4:
      pending.append(rt.prepare_placement(b))
      events.append("copy")
    elif t == 5:
      rt.commit(pending[0])
      events.append("swap")

  out = rt.generate(prompts, 4, on_step=on_step)
  assert events == ["copy", "swap"] and out.forwards == 4
  np.testing.assert_array_equal(np.concatenate(out.tokens), want)
  np.testing.assert_array_equal(rt.placement.hosts, b.hosts)
  assert out.send_rows.sum() > 0 and np.all(np.diag(out.send_rows) == 0)


def test_failure_with_replicas_reroutes_at_once(model, mesh, requests):
  hosts = np.ones((N, L, E), bool)
  hosts[::2, :, ::2] = False  # every expert keeps >= 4 replicas
  rt = ServingRuntime(mesh, model, make_placement(hosts, N), problem=problem())
  result = rt.fail_server(5)
  assert result.unreachable == () and result.report.orphans == ()
  assert result.reload is not None and result.reload.moves == 0
  assert not rt.placement.hosts[5].any() and rt.failed_servers == (5,)
  live = [r if n != 5 else r[:0] for n, r in enumerate(requests)]
  res = rt.step(live)
  want_logits, want_ids = reference(model, live)
  assert_matches(res, want_logits, want_ids)
  assert res.send_rows[:, :, 5].sum() == 0
  with pytest.raises(ServingError, match="server 5 has failed"):
    rt.step(requests)
  with pytest.raises(ServingError, match="already failed"):
    rt.fail_server(5)


def test_failure_of_sole_holder_is_loud_until_reloaded(model, mesh, requests):
  p = scenario("expert_parallel", N, np.random.default_rng(5))  # every expert once
  rt = ServingRuntime(mesh, model, p, problem=problem(), num_slots=E)
  dead = 2
  result = rt.fail_server(dead, reload=False)
  orphans = {(int(l), int(e)) for l, e in np.argwhere(p.hosts[dead])}
  assert set(result.unreachable) == orphans and set(rt.unreachable) == orphans
  assert result.reload is None

  live = [r if n != dead else r[:0] for n, r in enumerate(requests)]
  rng = np.random.default_rng(6)
  safe = [[e for e in range(E) if (l, e) not in orphans] for l in range(L)]
  ids = []
  for r in live:  # K distinct non-orphan experts per token and layer
    per_layer = [np.asarray(safe[l])[np.argsort(rng.random((r.shape[0], S, len(safe[l]))),
                                                axis=-1)[..., :K]] for l in range(L)]
    ids.append(np.stack(per_layer, axis=2).astype(np.int32))
  gates = [rng.random(i.shape).astype(np.float32) for i in ids]
  res = rt.step(live, routing=(ids, gates))  # no orphan picked: served
  assert_matches(res, reference(model, live, (ids, gates))[0])

  l0, e0 = sorted(orphans)[0]
  ids_bad = [i.copy() for i in ids]
  ids_bad[0][0, 0, l0, 0] = e0  # one choice of one token of server 0 (the rest avoid orphans)
  with pytest.raises(UnreachableExpertError, match=f"failed server.*{dead}"):
    rt.step(live, routing=(ids_bad, gates))

  report = rt.recover()
  assert rt.unreachable == () and not rt.placement.hosts[dead].any()
  assert {(c.layer, c.expert) for c in report.storage_copies} == orphans
  assert report.storage_bytes == len(orphans) * rt.expert_bytes and report.link_bytes == 0
  res = rt.step(live, routing=(ids_bad, gates))
  assert_matches(res, reference(model, live, (ids_bad, gates))[0])


def test_bad_requests_raise_clear_errors(model, mesh, requests):
  p = scenario("replicas", N, np.random.default_rng(7))
  with pytest.raises(dispatch_lib.DispatchError, match="ragged.*GPU"):
    ServingRuntime(mesh, model, p, transport="ragged")
  rt = ServingRuntime(mesh, model, p)
  with pytest.raises(ServingError, match="batches for 3 servers"):
    rt.step(requests[:3])
  with pytest.raises(ServingError, match="vocab_size"):
    rt.step([r + MODEL.vocab_size for r in requests])
  with pytest.raises(ServingError, match="max_seq_len"):
    rt.generate(requests, MODEL.max_seq_len)
  with pytest.raises(ServingError, match="needs the placement problem"):
    rt.fail_server(0)
  other = scenario("replicas", 4, np.random.default_rng(8))
  with pytest.raises(ServingError, match=r"\[8, 2, 8\]"):
    rt.apply_placement(other)


def test_per_layer_slot_weights_equal_stacked(model, mesh):
  p = scenario("uneven", N, np.random.default_rng(9))
  tables = mesh_lib.tables_from_placement(p)
  w = expert_weights(model)
  stacked = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, mesh)
  per = mesh_lib.shard_layer_weights(w["w_gate"], w["w_up"], w["w_down"], tables, mesh)
  assert len(per) == L
  for l in range(L):
    for name in mesh_lib.WEIGHT_NAMES:
      assert per[l][name].sharding.spec[0] == "server"
      np.testing.assert_array_equal(np.asarray(per[l][name]), np.asarray(stacked[name][:, l]))
  fused = mesh_lib.shard_layer_weights(w["w_gate"], w["w_up"], w["w_down"], tables, mesh,
                                       fuse_gate_up=True)
  fn = dispatch_lib.distributed_moe_fn(mesh, tables, fused)
  assert all(fn.layer_weights[l] is fused[l] for l in range(L))  # fused at load: used as is
  fn = dispatch_lib.distributed_moe_fn(mesh, tables, per)  # separate: fused once here
  for l in range(L):
    np.testing.assert_array_equal(np.asarray(fn.layer_weights[l]["w_gate_up"]),
                                  np.asarray(fused[l]["w_gate_up"]))
  with pytest.raises(dispatch_lib.DispatchError, match="has 1 layers but the tables have 2"):
    dispatch_lib.distributed_moe_fn(mesh, tables, per[:1])
  with pytest.raises(dispatch_lib.DispatchError, match=r"slot_weights\[0\] lacks"):
    dispatch_lib.distributed_moe_fn(mesh, tables, [{"w_gate": per[0]["w_gate"]}, per[1]])
