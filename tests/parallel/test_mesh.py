"""Mesh, slot tables and sharded expert weights (8 host CPU devices)."""
import dataclasses

import jax
import numpy as np
import pytest

from _parallel_util import E, L, MODEL, cover, make_placement, scenario, weights
from moe_edge.config import model_config
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.parallel.mesh import MeshError


# ---- mesh ----------------------------------------------------------------------------------
def test_server_mesh_natural_order_and_subset():
  m = mesh_lib.server_mesh(8)
  assert m.axis_names == ("server",)
  assert [d.id for d in m.devices] == sorted(d.id for d in jax.devices())
  m4 = mesh_lib.server_mesh(4)
  assert [d.id for d in m4.devices] == [d.id for d in jax.devices()[:4]]
  shuffled = [jax.devices()[i] for i in (3, 1, 2, 0)]
  assert [d.id for d in mesh_lib.server_mesh(4, shuffled).devices] == [d.id for d in
                                                                       jax.devices()[:4]]


def test_server_mesh_errors_say_how_to_get_devices():
  with pytest.raises(MeshError, match=r"9 servers.*8 cpu device.*xla_force_host_platform"):
    mesh_lib.server_mesh(9)
  with pytest.raises(MeshError, match="got 3 devices for 4 servers"):
    mesh_lib.server_mesh(4, jax.devices()[:3])
  with pytest.raises(MeshError, match="twice"):
    mesh_lib.server_mesh(2, [jax.devices()[0]] * 2)
  with pytest.raises(MeshError, match="positive"):
    mesh_lib.server_mesh(0)


# ---- tables --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["replicas", "uneven", "random_route"])
def test_tables_match_placement_by_loops(name):
  rng = np.random.default_rng(1)
  p = scenario(name, 8, rng)
  t = mesh_lib.tables_from_placement(p, model=MODEL)
  assert (t.num_servers, t.num_layers, t.num_experts, t.num_slots) == (8, L, E, E)
  np.testing.assert_array_equal(t.route, p.route)
  for n, l, e in np.ndindex(p.hosts.shape):
    m = p.route[n, l, e]
    assert p.hosts[m, l, e]
    assert t.slot_expert[m, l, t.dest_slot[n, l, e]] == e
  np.testing.assert_array_equal(t.slots_used, p.hosts.sum(axis=2))
  np.testing.assert_array_equal(t.experts_per_server, p.hosts.sum(axis=(1, 2)))


def test_tables_pad_slots_and_keep_real_counts():
  rng = np.random.default_rng(2)
  hosts = cover(rng.random((8, L, E)) < 0.2, rng)
  p = make_placement(hosts, 8, num_slots=None)  # S = largest per-layer count
  s = int(hosts.sum(axis=2).max())
  assert p.num_slots == s
  t = mesh_lib.tables_from_placement(p, num_slots=s + 3)
  assert t.num_slots == s + 3
  assert np.all(t.slot_expert[..., s:] == -1)
  np.testing.assert_array_equal(t.slots_used, hosts.sum(axis=2))
  with pytest.raises(MeshError, match="smaller than the placement"):
    mesh_lib.tables_from_placement(p, num_slots=s - 1)


def test_tables_reject_invalid_placement_and_other_model():
  rng = np.random.default_rng(3)
  p = scenario("replicas", 8, rng)
  n, l, e = np.argwhere(~p.hosts)[0]
  route = p.route.copy()
  route[n, l, e] = np.flatnonzero(~p.hosts[:, l, e])[-1]  # a server without that expert
  with pytest.raises(MeshError, match="invalid placement.*does not host"):
    mesh_lib.tables_from_placement(dataclasses.replace(p, route=route))
  with pytest.raises(MeshError, match="another model"):
    mesh_lib.tables_from_placement(p, model=model_config("small_moe"))


# ---- weights -------------------------------------------------------------------------------
def test_shard_expert_weights_gathers_slots_per_device():
  rng = np.random.default_rng(4)
  p = scenario("uneven", 8, rng)
  t = mesh_lib.tables_from_placement(p)
  w = weights(rng)
  m = mesh_lib.server_mesh(8)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], t, m)
  for name in mesh_lib.WEIGHT_NAMES:
    arr = sw[name]
    assert arr.shape == (8, L, E) + w[name].shape[2:]
    assert arr.sharding.spec[0] == "server"
    for shard in arr.addressable_shards:
      n = shard.index[0].start
      assert shard.device == m.devices[n]
      block = np.asarray(shard.data)[0]
      for l in range(L):
        for s in range(t.num_slots):
          e = t.slot_expert[n, l, s]
          want = w[name][l, e] if e >= 0 else np.zeros(w[name].shape[2:], np.float32)
          np.testing.assert_array_equal(block[l, s], want)


def test_shard_expert_weights_rejects_mismatch():
  rng = np.random.default_rng(5)
  t = mesh_lib.tables_from_placement(scenario("replicas", 8, rng))
  w = weights(rng)
  m = mesh_lib.server_mesh(8)
  with pytest.raises(MeshError, match="different models"):
    mesh_lib.shard_expert_weights(w["w_gate"][:1], w["w_up"][:1], w["w_down"][:1], t, m)
  with pytest.raises(MeshError, match="disagree"):
    mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_gate"], t, m)
  with pytest.raises(MeshError, match="4 axes"):
    mesh_lib.shard_expert_weights(w["w_gate"][0], w["w_up"], w["w_down"], t, m)
  with pytest.raises(MeshError, match=r"8 servers but the mesh has 4"):
    mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], t,
                                  mesh_lib.server_mesh(4))


# ---- token layout --------------------------------------------------------------------------
def test_pack_unpack_rows_roundtrip_and_shard():
  rng = np.random.default_rng(6)
  per = [rng.normal(size=(c, 3)).astype(np.float32) for c in (2, 0, 5, 1)]
  packed, mask = mesh_lib.pack_rows(per)
  assert packed.shape == (20, 3) and mask.sum() == 8
  assert np.all(packed[~mask] == 0)
  for a, b in zip(per, mesh_lib.unpack_rows(packed, mask, 4)):
    np.testing.assert_array_equal(a, b)
  arr = mesh_lib.shard_rows(packed, mesh_lib.server_mesh(4))
  for shard in arr.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), packed[shard.index[0]])
  with pytest.raises(MeshError, match="multiple of the 4 servers"):
    mesh_lib.shard_rows(packed[:-1], mesh_lib.server_mesh(4))
  with pytest.raises(MeshError, match="fewer than the 5"):
    mesh_lib.pack_rows(per, rows=3)
