"""The full MoE transformer: numpy reference, replay, hooks, causality, gradients, dense layers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import model_config
from moe_edge.model import experts
from moe_edge.model.transformer import (MLP, ModelError, MoEBlock, MoETransformer, expert_weights,
                                        generate, lm_loss, token_losses)
from moe_np_ref import to_np64, transformer_np

TINY = model_config("tiny")
# DeepSeek-like: a dense first layer, two shared experts, no renormalisation, tied embeddings.
DEEPSEEK_LIKE = dataclasses.replace(TINY, name="tiny_deepseek", n_layers=3, first_dense_layers=1,
                                    d_ff_dense=48, n_shared_experts=2, d_ff_shared=16,
                                    norm_topk_prob=False, tie_embeddings=True)


def tokens(b, s, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=(b, s)), jnp.int32)


@pytest.fixture(scope="module")
def tiny_model():
  return MoETransformer(TINY, nnx.Rngs(0))


def params_np(model):
  return to_np64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("cfg", [TINY, DEEPSEEK_LIKE], ids=["tiny", "deepseek_like"])
def test_matches_numpy_reference(cfg):
  model = MoETransformer(cfg, nnx.Rngs(1))
  tok = tokens(2, 8, seed=1)
  logits, aux = model(tok)
  ref_logits, ref_ids = transformer_np(np.asarray(tok), params_np(model), cfg)
  l, k = cfg.n_moe_layers, cfg.top_k
  assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["expert_ids"].shape == (2, 8, l, k) and aux["gates"].shape == (2, 8, l, k)
  assert aux["aux_loss"].shape == () and np.isfinite(float(aux["aux_loss"]))
  np.testing.assert_array_equal(np.asarray(aux["expert_ids"]), ref_ids)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=2e-4, atol=2e-4)


def test_dense_first_layers_structure():
  model = MoETransformer(DEEPSEEK_LIKE, nnx.Rngs(2))
  assert isinstance(model.layers[0].ffn, MLP)
  assert all(isinstance(layer.ffn, MoEBlock) for layer in model.layers[1:])
  assert [b.layer for b in model.moe_blocks()] == [0, 1]
  assert not hasattr(model, "lm_head")  # tied
  seen = []

  def recording(layer, x, ids, gates, w_gate, w_up, w_down):
    seen.append(layer)
    b, s, _ = x.shape
    return experts.moe_dense_reference(x.reshape(b * s, -1), ids.reshape(b * s, -1),
                                       gates.reshape(b * s, -1), w_gate, w_up,
                                       w_down).reshape(x.shape)

  tok = tokens(2, 8)
  out, _ = model(tok, moe_fn=recording)
  assert seen == [0, 1]
  np.testing.assert_allclose(np.asarray(out), np.asarray(model(tok)[0]), rtol=1e-6, atol=1e-6)


def test_replay_reproduces_logits(tiny_model):
  tok = tokens(2, 8, seed=3)
  logits, aux = tiny_model(tok)
  replayed, aux2 = tiny_model(tok, routing=(aux["expert_ids"], aux["gates"]))
  np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(aux2["expert_ids"]), np.asarray(aux["expert_ids"]))
  # a different routing changes the output, and what the model reports is the override
  other = (aux["expert_ids"] + 1) % TINY.n_experts
  changed, aux3 = tiny_model(tok, routing=(other, aux["gates"]))
  np.testing.assert_array_equal(np.asarray(aux3["expert_ids"]), np.asarray(other))
  assert not np.allclose(np.asarray(changed), np.asarray(logits))
  with pytest.raises(ModelError, match="routing must be"):
    tiny_model(tok, routing=(aux["expert_ids"][:, :, :1], aux["gates"][:, :, :1]))


def test_causal_masking(tiny_model):
  tok = tokens(2, 8, seed=4)
  changed = tok.at[:, 5].set((tok[:, 5] + 1) % 256)
  a, _ = tiny_model(tok)
  b, _ = tiny_model(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
  assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_gradients_finite_and_reach_every_parameter_kind(tiny_model):
  tok = tokens(2, 17, seed=5)
  graphdef, state = nnx.split(tiny_model)
  grads = jax.jit(jax.grad(lambda s: lm_loss(nnx.merge(graphdef, s), tok)[0]))(state)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
  for path, g in flat:
    assert np.all(np.isfinite(np.asarray(g))), path
  names = {jax.tree_util.keystr(p) for p, g in flat if np.abs(np.asarray(g)).max() > 0}
  for needed in ("w_router", "w_gate", "shared_w_down", "wq", "embed", "lm_head", "scale"):
    assert any(needed in n for n in names), needed


def test_lm_loss_and_token_losses(tiny_model):
  tok = tokens(2, 9, seed=6)
  nll, _ = token_losses(tiny_model, tok)
  logits, aux = tiny_model(tok[:, :-1])
  lp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  ref = -np.take_along_axis(np.asarray(lp), np.asarray(tok[:, 1:])[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(nll), ref, rtol=1e-5)
  loss, m = lm_loss(tiny_model, tok)
  np.testing.assert_allclose(float(loss), ref.mean() + TINY.aux_loss_coef * float(aux["aux_loss"]),
                             rtol=1e-5)
  assert set(m) == {"loss", "nll", "aux_loss"}


def test_expert_weights_stack_the_blocks(tiny_model):
  w = expert_weights(tiny_model)
  l, e, d, f = TINY.n_moe_layers, TINY.n_experts, TINY.d_model, TINY.d_ff_expert
  assert w["w_gate"].shape == (l, e, d, f) and w["w_up"].shape == (l, e, d, f)
  assert w["w_down"].shape == (l, e, f, d)
  for i, block in enumerate(tiny_model.moe_blocks()):
    np.testing.assert_array_equal(np.asarray(w["w_down"][i]), np.asarray(block.w_down[...]))


def test_generate_greedy_matches_step_by_step_argmax(tiny_model):
  prompt = tokens(2, 4, seed=7)
  out = generate(tiny_model, prompt, max_new=4)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(prompt))
  # causal model: logits at t-1 of the finished sequence are those generation saw at step t
  logits, _ = tiny_model(out)
  np.testing.assert_array_equal(np.asarray(out[:, 4:]),
                                np.asarray(jnp.argmax(logits[:, 3:7], axis=-1)))
  sampled = generate(tiny_model, prompt, 4, temperature=1.0, rng=jax.random.key(0))
  assert sampled.shape == (2, 8) and int(sampled.max()) < 256
  with pytest.raises(ModelError, match="rng"):
    generate(tiny_model, prompt, 3, temperature=0.5)
  with pytest.raises(ModelError, match="max_seq_len"):
    generate(tiny_model, prompt, TINY.max_seq_len)


def test_input_errors(tiny_model):
  with pytest.raises(ModelError, match="max_seq_len"):
    tiny_model(tokens(1, TINY.max_seq_len + 1))
  with pytest.raises(ModelError, match=r"\[B, S\]"):
    tiny_model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ModelError, match="integer"):
    tiny_model(jnp.zeros((1, 4), jnp.float32))
