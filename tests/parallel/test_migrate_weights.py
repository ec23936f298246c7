"""Moving expert weights between devices: only the experts that change hosts cross the wire (as
compiled), kept experts keep their slots and bytes, and the copies match the migration planner.
8 host CPU devices, tiny model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _parallel_util import E, K, L, MODEL, cluster, cover, make_placement, scenario
from moe_edge.model.transformer import MoETransformer, expert_weights
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.parallel.runtime import ServingRuntime, collective_permute_bytes
from moe_edge import migration as mig
from moe_edge.placement.problem import PlacementProblem

N = 8
COLLECTIVES = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter", "collective_broadcast")


@pytest.fixture(scope="module")
def model():
  return MoETransformer(MODEL, nnx.Rngs(jax.random.key(0, impl="rbg")))  # fast init on CPU


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.server_mesh(N)


def slot_contents(rt) -> dict[str, np.ndarray]:
  """``{name: [N, L, S, ...]}`` host copy of the runtime's slot arrays."""
  per = rt.slot_weights()
  assert set(per[0]) == {"w_gate_up", "w_down"}  # fused once at load, kept fused by copies
  return {name: np.stack([np.asarray(per[l][name]) for l in range(L)], axis=1)
          for name in per[0]}


def expected_contents(slot_expert, w) -> dict[str, np.ndarray]:
  """What the slots must hold: expert ``slot_expert[n, l, s]``'s weights, zeros when empty."""
  out = {}
  w = {"w_gate_up": np.concatenate([np.asarray(w["w_gate"]), np.asarray(w["w_up"])], axis=-1),
       "w_down": w["w_down"]}
  for name, arr in w.items():
    arr = np.asarray(arr)
    got = arr[np.arange(L)[None, :, None], np.maximum(slot_expert, 0)]
    out[name] = np.where((slot_expert >= 0)[..., None, None], got, 0)
  return out


def test_only_moved_experts_cross_devices_and_kept_slots_stay(model, mesh):
  rng = np.random.default_rng(0)
  old = scenario("replicas", N, rng)
  hosts = old.hosts.copy()
  hosts[rng.random(hosts.shape) < 0.15] ^= True  # add and drop some replicas
  new = make_placement(cover(hosts, rng), N)
  prob = PlacementProblem.build(MODEL, cluster(N), np.full((N, L, E), K / E),
                                capacity=np.full(N, L * E))
  rt = ServingRuntime(mesh, model, old, problem=prob, num_slots=E)
  before = slot_contents(rt)
  old_slots = rt.tables.slot_expert.copy()

  pending = rt.prepare_placement(new)
  report = pending.report
  text = pending.program_text()
  added = new.hosts & ~old.hosts
  assert report.moves == added.sum() > 0 and report.storage_copies == ()
  assert {(c.server, c.layer, c.expert) for c in report.copies} == set(map(tuple,
                                                                          np.argwhere(added)))
  for c in report.copies:  # every copy reads a current holder's slot
    assert old.hosts[c.source, c.layer, c.expert] and c.source != c.server
    assert old_slots[c.source, c.layer, c.source_slot] == c.expert
  # As compiled: the collectives carry exactly the added replicas, nothing else crosses devices.
  assert collective_permute_bytes(text) == added.sum() * rt.expert_bytes == report.wire_bytes
  assert report.wire_bytes == report.link_bytes
  assert not any(f"stablehlo.{op}" in text for op in COLLECTIVES)
  # The planner counts the same copies (model.expert_bytes: float32 tiny model, same bytes).
  plan = mig.move_cost(old, new, MODEL, prob.cluster, prob.capacity)
  assert plan.moves == report.moves and plan.bytes == report.link_bytes

  rt.commit(pending.block())
  slot_new = rt.tables.slot_expert
  np.testing.assert_array_equal(slot_new, mig.assign_slots_stable(old_slots, new.hosts))
  kept = (old_slots >= 0) & (slot_new[:, :, :old_slots.shape[2]] == old_slots)
  assert report.kept == kept.sum() and report.dropped == ((old_slots >= 0) & ~kept).sum()
  after = slot_contents(rt)
  want = expected_contents(slot_new, expert_weights(model))
  for name in want:
    np.testing.assert_array_equal(after[name], want[name])
    np.testing.assert_array_equal(after[name][kept], before[name][kept])  # bit for bit


def test_incremental_plan_under_drift_and_slot_growth(model, mesh):
  """plan_incremental's placement (tight memory, budget of moves) is applied as planned; a
  runtime started with S < E grows its slots when the new placement needs more."""
  rng = np.random.default_rng(1)
  freq = rng.dirichlet(np.ones(E), size=(N, L)) * K
  prob = PlacementProblem.build(MODEL, cluster(N), freq, capacity=np.full(N, 4))
  hosts = np.zeros((N, L, E), bool)
  for l in range(L):
    hosts[(np.arange(E) + l) % N, l, np.arange(E)] = True  # one copy each, 2 per server
  start = make_placement(hosts, N, num_slots=None)
  rt = ServingRuntime(mesh, model, start, problem=prob)
  s0 = rt.num_slots
  drifted = dataclasses.replace(prob, freq=np.roll(freq, 3, axis=0))
  planned = mig.plan_incremental(drifted, rt.placement, max_moves=6)
  assert 0 < len(planned.info["moves"]) <= 6
  report = rt.apply_placement(planned)
  assert report.moves == len(planned.info["moves"])
  assert {(c.server, c.layer, c.expert) for c in report.copies} == set(
      map(tuple, planned.info["moves"]))
  np.testing.assert_array_equal(rt.placement.hosts, planned.hosts)
  np.testing.assert_array_equal(rt.tables.slot_expert[:, :, :planned.num_slots],
                                planned.slot_expert)  # the planner's stable slots, unchanged
  assert report.num_slots == (s0, rt.num_slots) and rt.num_slots > s0  # grown
  want = expected_contents(rt.tables.slot_expert, expert_weights(model))
  got = slot_contents(rt)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  tokens = [rng.integers(0, MODEL.vocab_size, (1, 8)).astype(np.int32) for _ in range(N)]
  logits, _ = model(jnp.asarray(np.concatenate(tokens)))
  np.testing.assert_allclose(np.concatenate(rt.step(tokens).logits), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)
