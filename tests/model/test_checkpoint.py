"""Orbax checkpoints: exact round trip of params and optimizer state, bf16 saving, errors."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from moe_edge.config import model_config
from moe_edge.model import checkpoint as ckpt
from moe_edge.model.transformer import MoETransformer, lm_loss

TINY = model_config("tiny")


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained():
  """A model and AdamW state after two real optimizer steps (non-trivial moments)."""
  model = MoETransformer(TINY, nnx.Rngs(0))
  tx = optax.adamw(1e-2)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)), jnp.int32)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), tok)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(2):
    params, opt_state = step(params, opt_state)
  return nnx.merge(graphdef, params), tx, opt_state


def test_round_trip_is_exact_with_optimizer_state(tmp_path, trained):
  model, tx, opt_state = trained
  ckpt.save_checkpoint(tmp_path / "c", model, opt_state, step=7)
  back, back_opt, step = ckpt.restore_checkpoint(tmp_path / "c", TINY, tx=tx)
  assert step == 7
  for a, b in zip(leaves(ckpt.params_dict(model)), leaves(ckpt.params_dict(back))):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(back_opt) == jax.tree.structure(opt_state)
  for a, b in zip(leaves(opt_state), leaves(back_opt)):
    np.testing.assert_array_equal(a, b)
  # without tx (or cfg) the params come back from the stored config alone
  only, none_opt, _ = ckpt.restore_checkpoint(tmp_path / "c")
  assert none_opt is None and only.cfg == TINY
  tok = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  np.testing.assert_array_equal(np.asarray(only(tok)[0]), np.asarray(model(tok)[0]))


def test_bf16_save_casts_back_to_float32(tmp_path):
  model = MoETransformer(TINY, nnx.Rngs(1))
  ckpt.save_checkpoint(tmp_path / "b", model, step=3, dtype=jnp.bfloat16)
  meta = ckpt.read_checkpoint_meta(tmp_path / "b")
  assert meta["param_dtype"] == "bfloat16" and meta["step"] == 3
  back, opt, _ = ckpt.restore_checkpoint(tmp_path / "b", "tiny", tx=optax.sgd(0.1))
  assert opt is None  # saved without optimizer state
  for a, b in zip(leaves(ckpt.params_dict(model)), leaves(ckpt.params_dict(back))):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).astype(np.float32), b)


def test_latest_and_prune(tmp_path):
  model = MoETransformer(TINY, nnx.Rngs(2))
  for s in (1, 5, 3):
    ckpt.save_checkpoint(ckpt.step_dir(tmp_path, s), model, step=s)
  (tmp_path / "step_00000009").mkdir()  # an interrupted save: no checkpoint.json
  assert ckpt.latest_checkpoint(tmp_path).name == "step_00000005"
  ckpt.prune_checkpoints(tmp_path, keep=2)
  assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 5]
  assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_errors(tmp_path, trained):
  model = MoETransformer(TINY, nnx.Rngs(3))
  ckpt.save_checkpoint(tmp_path / "c", model)
  wider = dataclasses.replace(TINY, d_ff_expert=TINY.d_ff_expert * 2)
  with pytest.raises(ckpt.CheckpointError, match="w_gate: model"):
    ckpt.restore_checkpoint(tmp_path / "c", wider)
  with pytest.raises(ckpt.CheckpointError, match="checkpoint.json is missing"):
    ckpt.restore_checkpoint(tmp_path / "nowhere")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("keep me")
  with pytest.raises(ckpt.CheckpointError, match="not a moe-edge checkpoint"):
    ckpt.save_checkpoint(tmp_path / "other", model)
  _, tx, opt_state = trained
  ckpt.save_checkpoint(tmp_path / "o", model, opt_state)
  with pytest.raises(ckpt.CheckpointError, match="optimizer state"):
    ckpt.restore_checkpoint(tmp_path / "o", tx=optax.chain(optax.clip(1.0), optax.adam(1e-3),
                                                           optax.scale_by_adam()))
