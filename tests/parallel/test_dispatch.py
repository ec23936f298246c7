"""The distributed MoE layer against dense references, and its traffic against the cost model.

8 host CPU devices, transport "padded". The "ragged" transport is compared with "padded" by
``test_ragged_equals_padded_on_gpu`` on a GPU backend (the one skip: XLA:CPU lacks
ragged_all_to_all).
"""
import jax
import numpy as np
import pytest

from _parallel_util import (D, E, K, L, MODEL, SCENARIOS, make_placement, numpy_moe,
                            numpy_send_counts, random_routing, remote_only_routing, scenario,
                            trace_of, weights)
from moe_edge.cost.model import bytes_matrix
from moe_edge.model.experts import moe_dense_reference
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.parallel.dispatch import DispatchError

T = 6  # tokens per server in the sweeps (one compiled shape)
TOL = dict(rtol=1e-5, atol=1e-5)
ACT = MODEL.activation_bytes


def _slots(sw, layer):
  return [sw[name][:, layer] for name in mesh_lib.WEIGHT_NAMES]


def _run_all_layers(placement, x, ids, gates, mask, w, n=8, transport="padded", capacity=None):
  """Run every layer; check y against both references and the stats against the counts.

  Returns the per-layer dispatch byte matrices ``[L, N, N]``.
  """
  m = mesh_lib.server_mesh(n)
  tables = mesh_lib.tables_from_placement(placement, model=MODEL)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m)
  fn = dispatch_lib.make_moe_dispatch(m, tables, transport=transport, capacity=capacity)
  out = []
  for l in range(L):
    y, stats = fn(x, ids[:, l], gates[:, l], *_slots(sw, l), mask=mask, layer=l)
    y = np.asarray(y)
    g = gates[:, l] * mask[:, None]
    want = numpy_moe(x, ids[:, l], g, w["w_gate"][l], w["w_up"][l], w["w_down"][l])
    np.testing.assert_allclose(y, want, **TOL)
    dense = moe_dense_reference(x, ids[:, l], g, w["w_gate"][l], w["w_up"][l], w["w_down"][l])
    np.testing.assert_allclose(y, np.asarray(dense), **TOL)
    counts = numpy_send_counts(placement.route, l, ids[:, l], mask, n)
    np.testing.assert_array_equal(np.asarray(stats.send_rows), counts)
    np.testing.assert_array_equal(dispatch_lib.send_counts(tables, l, ids[:, l], mask), counts)
    remote = np.asarray(stats.remote_choices)
    local = np.asarray(stats.local_choices)
    np.testing.assert_array_equal(remote, counts.sum(axis=1))
    np.testing.assert_array_equal(local + remote, mask.reshape(n, -1).sum(axis=1) * K)
    assert not bool(stats.overflow)
    out.append(stats.dispatch_bytes(ACT))
  return np.stack(out)


def _deployed(kind: str, n: int, rng: np.random.Generator):
  """A ``scenario`` placement on an ``n``-device mesh with random expert weights in its slots:
  ``(placement, tables, mesh, slot_weights)``."""
  p = scenario(kind, n, rng)
  tables = mesh_lib.tables_from_placement(p)
  w = weights(rng)
  m = mesh_lib.server_mesh(n)
  return p, tables, m, mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"],
                                                     tables, m)


@pytest.mark.parametrize("name", SCENARIOS)
def test_layer_matches_references_and_cost_model(name):
  for seed in range(2):
    rng = np.random.default_rng([seed, SCENARIOS.index(name)])
    p = scenario(name, 8, rng)
    w = weights(rng)
    x = rng.normal(size=(8 * T, D)).astype(np.float32)
    ids, gates = random_routing(rng, 8 * T)
    mask = np.ones(8 * T, bool)
    got = _run_all_layers(p, x, ids, gates, mask, w)
    want = bytes_matrix(trace_of(ids, gates, mask, 8), p, ACT)
    np.testing.assert_array_equal(got, want)
    if name == "all_local":
      assert got.sum() == 0
    else:
      assert got.sum() > 0


def test_all_remote_every_choice_travels():
  rng = np.random.default_rng(11)
  p = scenario("expert_parallel", 8, rng)
  w = weights(rng)
  x = rng.normal(size=(8 * T, D)).astype(np.float32)
  ids = remote_only_routing(rng, p.hosts, T)
  gates = rng.random(ids.shape).astype(np.float32)
  mask = np.ones(8 * T, bool)
  got = _run_all_layers(p, x, ids, gates, mask, w)
  np.testing.assert_array_equal(got.sum(axis=2), np.full((L, 8), T * K * ACT))
  np.testing.assert_array_equal(got, bytes_matrix(trace_of(ids, gates, mask, 8), p, ACT))


def test_masked_rows_give_zeros_and_send_nothing():
  """Uneven per-server batches (one server idle) packed with a mask; padding holds NaN."""
  rng = np.random.default_rng(12)
  p = scenario("replicas", 8, rng)
  w = weights(rng)
  real = [T, 0, 3, 1, T, 2, 5, 4]
  per = [rng.normal(size=(c, D)).astype(np.float32) for c in real]
  x, mask = mesh_lib.pack_rows(per, rows=T)
  x[~mask] = np.nan  # padding must never reach a valid row
  ids, gates = random_routing(rng, 8 * T)
  got = _run_all_layers(p, np.where(mask[:, None], x, 0), ids, gates, mask, w)
  np.testing.assert_array_equal(got, bytes_matrix(trace_of(ids, gates, mask, 8), p, ACT))
  m = mesh_lib.server_mesh(8)
  tables = mesh_lib.tables_from_placement(p)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m)
  y, stats = dispatch_lib.make_moe_dispatch(m, tables, 0)(x, ids[:, 0], gates[:, 0],
                                                          *_slots(sw, 0), mask=mask)
  y = np.asarray(y)
  assert np.all(y[~mask] == 0)
  want = numpy_moe(np.where(mask[:, None], x, 0), ids[:, 0], gates[:, 0] * mask[:, None],
                   w["w_gate"][0], w["w_up"][0], w["w_down"][0])
  np.testing.assert_allclose(y[mask], want[mask], **TOL)
  assert np.asarray(stats.send_rows)[1].sum() == 0  # the idle server sends nothing
  assert int(np.asarray(stats.local_choices)[1]) == 0


def test_four_servers_and_unpadded_slots():
  """A mesh over the first 4 devices, slots not padded to E (S = the largest real count)."""
  rng = np.random.default_rng(13)
  hosts = rng.random((4, L, E)) < 0.45
  hosts[2, 0] = False
  for l, e in np.argwhere(~hosts.any(axis=0)):
    hosts[rng.integers(4), l, e] = True
  p = make_placement(hosts, 4, num_slots=None)
  assert p.num_slots < E
  w = weights(rng)
  x = rng.normal(size=(4 * T, D)).astype(np.float32)
  ids, gates = random_routing(rng, 4 * T)
  mask = np.ones(4 * T, bool)
  got = _run_all_layers(p, x, ids, gates, mask, w, n=4)
  np.testing.assert_array_equal(got, bytes_matrix(trace_of(ids, gates, mask, 4), p, ACT))


def test_capacity_bound_is_proven_and_overflow_refused():
  rng = np.random.default_rng(14)
  p, tables, m, sw = _deployed("expert_parallel", 8, rng)
  x = rng.normal(size=(8 * T, D)).astype(np.float32)
  ids, gates = random_routing(rng, 8 * T)
  need = dispatch_lib.required_capacity(tables, 0, ids[:, 0])
  counts = numpy_send_counts(p.route, 0, ids[:, 0], np.ones(8 * T, bool), 8)
  assert need == counts.max() >= 1
  cap = dispatch_lib.bucket_capacity(need, minimum=1)
  assert cap >= need and cap & (cap - 1) == 0
  y_safe, _ = dispatch_lib.make_moe_dispatch(m, tables, 0)(x, ids[:, 0], gates[:, 0],
                                                           *_slots(sw, 0))
  y_cap, stats = dispatch_lib.make_moe_dispatch(m, tables, 0, capacity=cap)(
      x, ids[:, 0], gates[:, 0], *_slots(sw, 0))
  assert not bool(stats.overflow)
  np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_safe), rtol=0, atol=0)
  if need > 1:
    small = dispatch_lib.make_moe_dispatch(m, tables, 0, capacity=need - 1)
    with pytest.raises(DispatchError, match=f"sends {need} rows.*capacity={need - 1}"):
      small(x, ids[:, 0], gates[:, 0], *_slots(sw, 0))
    # Inside a jitted program the same overflow cannot raise: the output is NaN, not wrong.
    y_bad, st = small._fn(*(mesh_lib.shard_rows(a, m) for a in (x, ids[:, 0], gates[:, 0])),
                          mesh_lib.shard_rows(np.ones(8 * T, bool), m),
                          small._tables["route"][:, 0], small._tables["dest_slot"][:, 0],
                          *_slots(sw, 0))
    assert bool(st.overflow) and np.all(np.isnan(np.asarray(y_bad)))
  for rows in (0, 1, 2, 3, 5, 8, 9, 100):
    b = dispatch_lib.bucket_capacity(rows)
    assert b >= max(rows, 8) and b & (b - 1) == 0 and (rows <= 8 or b < 2 * rows)


def test_bad_inputs_raise_clear_errors():
  rng = np.random.default_rng(15)
  p, tables, m, sw = _deployed("replicas", 8, rng)
  x = rng.normal(size=(8 * T, D)).astype(np.float32)
  ids, gates = random_routing(rng, 8 * T)
  fn = dispatch_lib.make_moe_dispatch(m, tables, 0)
  with pytest.raises(DispatchError, match="ragged.*GPU.*padded"):
    dispatch_lib.make_moe_dispatch(m, tables, 0, transport="ragged")
  with pytest.raises(DispatchError, match="unknown transport"):
    dispatch_lib.make_moe_dispatch(m, tables, 0, transport="nccl")
  with pytest.raises(DispatchError, match="capacity"):
    dispatch_lib.make_moe_dispatch(m, tables, 0, capacity=0)
  with pytest.raises(mesh_lib.MeshError, match="layer 5"):
    dispatch_lib.make_moe_dispatch(m, tables, 5)
  with pytest.raises(mesh_lib.MeshError, match="mesh has 4"):
    dispatch_lib.make_moe_dispatch(mesh_lib.server_mesh(4), tables, 0)
  with pytest.raises(mesh_lib.MeshError, match="multiple of the 8"):
    fn(x[:-1], ids[:-1, 0], gates[:-1, 0], *_slots(sw, 0))
  bad = ids[:, 0].copy()
  bad[3, 1] = E
  with pytest.raises(DispatchError, match=r"expert ids must lie in \[0, 8\)"):
    fn(x, bad, gates[:, 0], *_slots(sw, 0))
  with pytest.raises(DispatchError, match="one layer's slot weights"):
    fn(x, ids[:, 0], gates[:, 0], sw["w_gate"], sw["w_up"], sw["w_down"])
  with pytest.raises(DispatchError, match="gates shape"):
    fn(x, ids[:, 0], gates[:, 0, :1], *_slots(sw, 0))
  with pytest.raises(DispatchError, match="no layer"):
    dispatch_lib.make_moe_dispatch(m, tables)(x, ids[:, 0], gates[:, 0], *_slots(sw, 0))


def test_ragged_equals_padded_on_gpu():
  """Both transports give the same output and traffic (needs a GPU: run with JAX_PLATFORMS=cuda
  on a machine with >= 2 GPUs, e.g. ``JAX_PLATFORMS=cuda pytest tests/parallel -k gpu``)."""
  if jax.default_backend() != "gpu":
    pytest.skip("transport='ragged' needs jax.lax.ragged_all_to_all, which XLA:CPU does not "
                "implement; this test runs on a GPU backend (JAX_PLATFORMS=cuda).")
  n = min(jax.device_count(), 8)
  rng = np.random.default_rng(16)
  p, tables, m, sw = _deployed("uneven", n, rng)
  per = [rng.normal(size=(c, D)).astype(np.float32) for c in rng.integers(0, 33, n)]
  x, mask = mesh_lib.pack_rows(per, rows=32)
  ids, gates = random_routing(rng, x.shape[0])
  with jax.default_matmul_precision("highest"):
    for l in range(L):
      ys = {}
      for transport in dispatch_lib.TRANSPORTS:
        fn = dispatch_lib.make_moe_dispatch(m, tables, l, transport=transport)
        y, stats = fn(x, ids[:, l], gates[:, l], *_slots(sw, l), mask=mask)
        ys[transport] = np.asarray(y)
        np.testing.assert_array_equal(np.asarray(stats.send_rows),
                                      numpy_send_counts(p.route, l, ids[:, l], mask, n))
        cap = dispatch_lib.bucket_capacity(dispatch_lib.required_capacity(tables, l, ids[:, l],
                                                                          mask))
        y_cap, _ = dispatch_lib.make_moe_dispatch(m, tables, l, transport, cap)(
            x, ids[:, l], gates[:, l], *_slots(sw, l), mask=mask)
        np.testing.assert_allclose(np.asarray(y_cap), ys[transport], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(ys["ragged"], ys["padded"], rtol=1e-6, atol=1e-6)
      want = numpy_moe(x, ids[:, l], gates[:, l] * mask[:, None], w["w_gate"][l],
                       w["w_up"][l], w["w_down"][l])
      np.testing.assert_allclose(ys["ragged"], want, rtol=1e-4, atol=1e-4)
