"""Orbax checkpoints: exact round trip of params and optimizer state, bf16 saving, errors;
atomic saves, checksums and the stored config (issue 14)."""
import dataclasses
import json
import shutil

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
  with pytest.raises(ckpt.CheckpointError, match=r"d_ff_expert 16 \(checkpoint\) vs 32 \(asked\)"):
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


# --------------------------------------------------------------------------------------------
# Integrity: atomic saves, checksums, the stored config (issue 14)
# --------------------------------------------------------------------------------------------
def _largest_data_file(directory):
  """The biggest orbax data file of a checkpoint's params (holds most of the weights)."""
  return max((p for p in (directory / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A real saved tiny checkpoint (copied before each corruption)."""
  path = tmp_path_factory.mktemp("saved") / "c"
  ckpt.save_checkpoint(path, MoETransformer(TINY, nnx.Rngs(4)), step=5)
  return path


def test_flipped_bytes_in_an_orbax_data_file_are_named(tmp_path, saved):
  bad = tmp_path / "flipped"
  shutil.copytree(saved, bad)
  data = _largest_data_file(bad)
  raw = bytearray(data.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 32] = bytes(b ^ 0xFF for b in raw[mid:mid + 32])
  data.write_bytes(bytes(raw))
  rel = data.relative_to(bad).as_posix()
  with pytest.raises(ckpt.CheckpointError, match=rf"file {rel} is corrupt"):
    ckpt.restore_checkpoint(bad, TINY)


def test_truncated_and_missing_files_are_named(tmp_path, saved):
  cut = tmp_path / "cut"
  shutil.copytree(saved, cut)
  data = _largest_data_file(cut)
  size = data.stat().st_size
  data.write_bytes(data.read_bytes()[:size // 3])
  with pytest.raises(ckpt.CheckpointError, match=rf"{data.name} has {size // 3:,} bytes but "
                                                 rf"{size:,} were written \(truncated\)"):
    ckpt.restore_checkpoint(cut)
  gone = tmp_path / "gone"
  shutil.copytree(saved, gone)
  shutil.rmtree(gone / "params")  # was reported as a config mismatch
  with pytest.raises(ckpt.CheckpointError, match=r"incomplete: file params/\S+ is missing"):
    ckpt.restore_checkpoint(gone, TINY)


def test_stored_config_must_match_the_asked_one(tmp_path, saved):
  """top_k 3 written into checkpoint.json of a top-2 model: refused, by config and checksum."""
  assert TINY.top_k == 2
  with pytest.raises(ckpt.CheckpointError, match=r"top_k 2 \(checkpoint\) vs 3 \(asked\)"):
    ckpt.restore_checkpoint(saved, dataclasses.replace(TINY, top_k=3))
  edited = tmp_path / "edited"
  shutil.copytree(saved, edited)
  meta = json.loads((edited / "checkpoint.json").read_text())
  meta["config"]["top_k"] = 3
  (edited / "checkpoint.json").write_text(json.dumps(meta, indent=1))
  with pytest.raises(ckpt.CheckpointError, match="file checkpoint.json"):
    ckpt.restore_checkpoint(edited, TINY)
  (edited / "checkpoint.json").write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.json is corrupt \(JSONDecodeError"):
    ckpt.restore_checkpoint(edited)


def test_interrupted_save_never_blocks_the_next_one(tmp_path):
  """What a kill during a save leaves (old layout: step_N with orbax's temporary params; new
  layout: a hidden .partial sibling) is listed by partial_checkpoints, ignored by
  latest_checkpoint, and replaced by the next save of that step."""
  model = MoETransformer(TINY, nnx.Rngs(5))
  ckpt.save_checkpoint(ckpt.step_dir(tmp_path, 20), model, step=20)
  old = ckpt.step_dir(tmp_path, 30)
  (old / "params.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
  (old / "params.orbax-checkpoint-tmp-1700000000" / "d").write_bytes(b"\0" * 100)
  new = tmp_path / ".step_00000040.partial-0123456789ab"
  (new / "params").mkdir(parents=True)
  assert ckpt.partial_checkpoints(tmp_path) == sorted([new, old])
  assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"
  ckpt.save_checkpoint(old, model, step=30)  # was: "exists and is not a moe-edge checkpoint"
  assert ckpt.latest_checkpoint(tmp_path) == old
  ckpt.verify_checkpoint(old)
  assert not list(old.glob("params.orbax-checkpoint-tmp-*"))


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
  """A save that fails midway (here: extra data that is not JSON) keeps the old checkpoint."""
  model = MoETransformer(TINY, nnx.Rngs(6))
  path = tmp_path / "c"
  ckpt.save_checkpoint(path, model, step=1)
  with pytest.raises(TypeError):
    ckpt.save_checkpoint(path, model, step=2, extra={"bad": object()})
  assert ckpt.read_checkpoint_meta(path)["step"] == 1
  ckpt.verify_checkpoint(path)
  assert ckpt.partial_checkpoints(tmp_path) == []
