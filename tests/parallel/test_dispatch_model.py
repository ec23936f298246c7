"""The whole tiny model with its MoE layers distributed over 8 servers equals the single-device
model (batch split over servers, experts placed per placement)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _parallel_util import E, K, L, MODEL, scenario
from moe_edge.model.transformer import MoETransformer, expert_weights
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.parallel.dispatch import DispatchError

N, B, S = 8, 8, 8
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
  model = MoETransformer(MODEL, nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, (B, S)).astype(np.int32)
  logits, aux = nnx.jit(lambda mdl, tok: mdl(tok))(model, jnp.asarray(tokens))
  return model, tokens, np.asarray(logits), aux


def _distributed(model, placement, transport="padded"):
  m = mesh_lib.server_mesh(N)
  tables = mesh_lib.tables_from_placement(placement, model=MODEL)
  w = expert_weights(model)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m)
  return m, dispatch_lib.distributed_moe_fn(m, tables, sw, transport)


@pytest.mark.parametrize("name", ["replicas", "expert_parallel", "uneven", "all_local"])
def test_model_logits_match_single_device(setup, name):
  model, tokens, want, aux_ref = setup
  p = scenario(name, N, np.random.default_rng(21))
  m, moe_fn = _distributed(model, p)
  logits, aux = model(mesh_lib.shard_rows(tokens, m), moe_fn=moe_fn)
  np.testing.assert_array_equal(np.asarray(aux["expert_ids"]), np.asarray(aux_ref["expert_ids"]))
  np.testing.assert_allclose(np.asarray(logits), want, **TOL)
  assert logits.sharding.spec[0] == "server"  # each server's requests stay on its device


def test_jitted_model_with_trace_replay(setup):
  model, tokens, _, _ = setup
  rng = np.random.default_rng(22)
  ids = np.argsort(rng.random((B, S, L, E)), axis=-1)[..., :K].astype(np.int32)
  gates = rng.random((B, S, L, K)).astype(np.float32)
  want, _ = model(jnp.asarray(tokens), routing=(jnp.asarray(ids), jnp.asarray(gates)))
  m, moe_fn = _distributed(model, scenario("random_route", N, rng))

  @nnx.jit
  def forward(mdl, tok, r_ids, r_gates):
    return mdl(tok, routing=(r_ids, r_gates), moe_fn=moe_fn)[0]

  got = forward(model, *(mesh_lib.shard_rows(a, m) for a in (tokens, ids, gates)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_model_level_errors(setup):
  model, tokens, _, _ = setup
  p = scenario("replicas", N, np.random.default_rng(23))
  m, moe_fn = _distributed(model, p)
  with pytest.raises(DispatchError, match="not a multiple of the 8 servers"):
    model(jnp.asarray(tokens[:4]), moe_fn=moe_fn)
  tables = mesh_lib.tables_from_placement(p)
  w = expert_weights(model)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m)
  with pytest.raises(DispatchError, match="lacks"):
    dispatch_lib.distributed_moe_fn(m, tables, {"w_gate": sw["w_gate"]})
  with pytest.raises(DispatchError, match=r"must be \[N, L, S, \.\.\.\]"):
    dispatch_lib.distributed_moe_fn(m, tables, {k: v[:, :1] for k, v in sw.items()})
  with pytest.raises(DispatchError, match="another model"):
    moe_fn(0, jnp.zeros((N, S, MODEL.d_model)), jnp.zeros((N, S, K), jnp.int32),
           jnp.zeros((N, S, K)), jnp.zeros((E + 1, MODEL.d_model, MODEL.d_ff_expert)))


def test_fused_slot_weights_and_layer_program_arity(setup):
  """Slot weights fused at load time (shard_layer_weights(fuse_gate_up=True)) give the same
  model (the layer program with 8 arguments; separate weights, 9, in test_dispatch.py)."""
  model, tokens, want, _ = setup
  m = mesh_lib.server_mesh(N)
  tables = mesh_lib.tables_from_placement(scenario("replicas", N, np.random.default_rng(21)),
                                          model=MODEL)
  w = expert_weights(model)
  fused = mesh_lib.shard_layer_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m,
                                       fuse_gate_up=True)
  assert set(fused[0]) == {"w_gate_up", "w_down"}
  assert fused[0]["w_gate_up"].shape[-1] == 2 * fused[0]["w_down"].shape[-2]
  logits, _ = model(mesh_lib.shard_rows(tokens, m),
                    moe_fn=dispatch_lib.distributed_moe_fn(m, tables, fused))
  np.testing.assert_allclose(np.asarray(logits), want, **TOL)
  with pytest.raises(DispatchError, match=r"lacks \['w_down'\]"):
    dispatch_lib.distributed_moe_fn(m, tables, [{"w_gate_up": f["w_gate_up"]} for f in fused])
