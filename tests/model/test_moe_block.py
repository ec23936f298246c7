"""MoE block and expert math against a plain numpy per-token loop."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import model_config
from moe_edge.model import experts
from moe_edge.model.transformer import ModelError, MoEBlock
from moe_np_ref import ffn_np, moe_np, to_np64

TINY = model_config("tiny")
VARIANTS = {
    "shared_norm": TINY,  # one shared expert, renormalised gates (Mixtral-style)
    "qwen_gate_nonorm": dataclasses.replace(TINY, shared_expert_gate=True, norm_topk_prob=False),
    "no_shared_nonorm": dataclasses.replace(TINY, n_shared_experts=0, d_ff_shared=0,
                                            norm_topk_prob=False),
    "two_shared_top3": dataclasses.replace(TINY, n_shared_experts=2, d_ff_shared=8, top_k=3),
}


def block_params(block):
  return to_np64(nnx.to_pure_dict(nnx.state(block, nnx.Param)))


def test_expert_ffn_matches_numpy():
  rng = np.random.default_rng(0)
  x, wg, wu, wd = (rng.normal(size=s).astype(np.float32) for s in [(5, 6), (6, 4), (6, 4), (4, 6)])
  got = experts.expert_ffn(*map(jnp.asarray, (x, wg, wu, wd)))
  ref = np.stack([ffn_np(t, wg, wu, wd) for t in x.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_dense_reference_counts_a_repeated_expert_twice():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  w = [rng.normal(size=s).astype(np.float32) for s in [(2, 4, 5), (2, 4, 5), (2, 5, 4)]]
  ids = np.array([[1, 1], [0, 1], [0, 0]], np.int32)
  gates = np.array([[0.25, 0.5], [1.0, 0.0], [0.5, 0.5]], np.float32)
  got = experts.moe_dense_reference(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(gates), *w)
  ref = np.stack([sum(gates[t, r] * ffn_np(x[t].astype(np.float64), w[0][ids[t, r]],
                                           w[1][ids[t, r]], w[2][ids[t, r]]) for r in range(2))
                  for t in range(3)])
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_block_matches_numpy_loop(name):
  cfg = VARIANTS[name]
  block = MoEBlock(cfg, layer=0, rngs=nnx.Rngs(3))
  x = np.random.default_rng(2).normal(size=(2, 7, cfg.d_model)).astype(np.float32)
  y, info = block(jnp.asarray(x))
  p = block_params(block)
  assert ("w_shared_gate" in p) == cfg.shared_expert_gate
  ref_y, ref_ids, ref_gates = moe_np(x.reshape(14, -1), p, cfg.top_k, cfg.norm_topk_prob)
  assert y.shape == x.shape and info.expert_ids.shape == (2, 7, cfg.top_k)
  assert info.router_probs.shape == (2, 7, cfg.n_experts)
  np.testing.assert_array_equal(np.asarray(info.expert_ids).reshape(14, -1), ref_ids)
  np.testing.assert_allclose(np.asarray(info.gates).reshape(14, -1), ref_gates, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(14, -1), ref_y, rtol=1e-4, atol=1e-5)
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(np.asarray(info.gates).sum(-1), 1.0, rtol=1e-6)


def test_routing_override_uses_given_ids_and_gates():
  cfg = VARIANTS["qwen_gate_nonorm"]
  block = MoEBlock(cfg, layer=0, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 6, cfg.d_model)).astype(np.float32)
  ids = rng.integers(0, cfg.n_experts, size=(1, 6, cfg.top_k)).astype(np.int32)
  gates = rng.uniform(size=(1, 6, cfg.top_k)).astype(np.float32)
  y, info = block(jnp.asarray(x), routing=(jnp.asarray(ids), jnp.asarray(gates)))
  ref_y, _, _ = moe_np(x[0], block_params(block), cfg.top_k, cfg.norm_topk_prob,
                       routing=(ids[0], gates[0]))
  np.testing.assert_array_equal(np.asarray(info.expert_ids), ids)
  np.testing.assert_array_equal(np.asarray(info.gates), gates)
  np.testing.assert_allclose(np.asarray(y)[0], ref_y, rtol=1e-4, atol=1e-5)
  with pytest.raises(ModelError, match="routing override"):
    block(jnp.asarray(x), routing=(jnp.asarray(ids[:, :3]), jnp.asarray(gates[:, :3])))


def test_moe_fn_replaces_routed_compute():
  cfg = TINY
  block = MoEBlock(cfg, layer=5, rngs=nnx.Rngs(6))
  x = np.random.default_rng(7).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
  calls = []

  def zero_moe(layer, xs, ids, gates, w_gate, w_up, w_down):
    calls.append((layer, xs.shape, ids.shape, gates.shape, w_gate.shape, w_down.shape))
    return jnp.zeros_like(xs)

  y, _ = block(jnp.asarray(x), moe_fn=zero_moe)
  e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
  assert calls == [(5, (2, 3, d), (2, 3, 2), (2, 3, 2), (e, d, f), (e, f, d))]
  p = block_params(block)
  shared_only = np.stack([ffn_np(t, p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
                          for t in x.reshape(6, d).astype(np.float64)])
  np.testing.assert_allclose(np.asarray(y).reshape(6, d), shared_only, rtol=1e-4, atol=1e-5)

  def dense(layer, xs, ids, gates, w_gate, w_up, w_down):
    b, s, _ = xs.shape
    out = experts.moe_dense_reference(xs.reshape(b * s, -1), ids.reshape(b * s, -1),
                                      gates.reshape(b * s, -1), w_gate, w_up, w_down)
    return out.reshape(xs.shape)

  np.testing.assert_allclose(np.asarray(block(jnp.asarray(x), moe_fn=dense)[0]),
                             np.asarray(block(jnp.asarray(x))[0]), rtol=1e-6, atol=1e-6)
  with pytest.raises(ModelError, match="moe_fn returned shape"):
    block(jnp.asarray(x), moe_fn=lambda layer, xs, *a: xs[:, :1])
