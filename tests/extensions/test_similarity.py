"""Expert similarity from weights and from calibration outputs, against plain numpy references."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import model_config
from moe_edge.extensions import similarity as sim_lib
from moe_edge.extensions.similarity import SimilarityError
from moe_edge.model.transformer import MoETransformer

TINY = model_config("tiny")


def _experts(rng, e=5, d=4, f=3):
  return (rng.normal(size=(e, d, f)), rng.normal(size=(e, d, f)), rng.normal(size=(e, f, d)))


def _response_tensor(g, u, w) -> np.ndarray:
  """The symmetrised quadratic response ``1/2 sum_i sym(g_i (x) u_i) (x) w_i``, explicitly."""
  d, f = g.shape
  q = np.zeros((d, d, d))
  for i in range(f):
    q += 0.25 * (np.einsum("a,b,c->abc", g[:, i], u[:, i], w[i]) +
                 np.einsum("a,b,c->abc", u[:, i], g[:, i], w[i]))
  return q


def _silu(a):
  return a / (1.0 + np.exp(-a))


def test_response_similarity_matches_explicit_tensors():
  g, u, w = _experts(np.random.default_rng(0))
  q = [_response_tensor(g[e], u[e], w[e]).ravel() for e in range(g.shape[0])]
  want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in q] for a in q])
  got = sim_lib.weight_similarity(g, u, w, "response")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_response_tensor_is_the_small_input_limit_of_the_expert():
  g, u, w = _experts(np.random.default_rng(1), e=1)
  x = np.random.default_rng(2).normal(size=4) * 1e-4
  y = (_silu(x @ g[0]) * (x @ u[0])) @ w[0]
  quad = np.einsum("abc,a,b->c", _response_tensor(g[0], u[0], w[0]), x, x)
  assert np.linalg.norm(y - quad) < 1e-3 * np.linalg.norm(quad)  # error O(|x|^3)


def test_response_is_permutation_and_scale_invariant_flat_is_not():
  rng = np.random.default_rng(3)
  g, u, w = _experts(rng, e=3)
  perm = rng.permutation(g.shape[2])
  g[1], u[1], w[1] = g[0][:, perm], u[0][:, perm], 2.5 * w[0][perm]  # same function, x2.5
  resp = sim_lib.weight_similarity(g, u, w, "response")
  flat = sim_lib.weight_similarity(g, u, w, "flat")
  assert resp[0, 1] == pytest.approx(1.0, abs=1e-6)
  assert flat[0, 1] < 0.99
  for s in (resp, flat):
    np.testing.assert_allclose(np.diag(s), 1.0)
    np.testing.assert_allclose(s, s.T, atol=1e-6)


def test_flat_similarity_matches_numpy():
  g, u, w = _experts(np.random.default_rng(4))
  v = np.concatenate([a.reshape(a.shape[0], -1) / np.linalg.norm(a.reshape(a.shape[0], -1),
                                                                  axis=1, keepdims=True)
                      for a in (g, u, w)], axis=1)
  want = v @ v.T / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
  np.testing.assert_allclose(sim_lib.weight_similarity(g, u, w, "flat"), want, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_output_similarity_matches_loops(weighted):
  rng = np.random.default_rng(5)
  g, u, w = (a.astype(np.float32) for a in _experts(rng, e=4, d=6, f=5))
  x = rng.normal(size=(37, 6)).astype(np.float32)
  wts = rng.random((37, 4)) * (rng.random((37, 4)) < 0.5) if weighted else None
  ys = [(_silu(x @ g[e]) * (x @ u[e])) @ w[e] for e in range(4)]
  want = np.eye(4)
  for a, b in itertools.permutations(range(4), 2):
    cos = np.sum(ys[a] * ys[b], 1) / np.linalg.norm(ys[a], axis=1) / np.linalg.norm(ys[b], axis=1)
    wa = np.ones(37) if wts is None else wts[:, a]
    want[a, b] = np.sum(wa * cos) / np.sum(wa)
  got = sim_lib.output_similarity(x, g, u, w, wts, chunk=16)  # several chunks
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_capture_reproduces_router_choices():
  model = MoETransformer(TINY, nnx.Rngs(0))
  tokens = np.random.default_rng(6).integers(0, TINY.vocab_size, (2, 9)).astype(np.int32)
  x, ids = sim_lib.capture_moe_inputs(model, tokens)
  _, aux = model(jnp.asarray(tokens))
  l, t, d = x.shape
  assert (l, t, d) == (TINY.n_moe_layers, 18, TINY.d_model)
  for i, block in enumerate(model.moe_blocks()):
    logits = x[i] @ np.asarray(block.w_router[...])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :TINY.top_k]
    np.testing.assert_array_equal(top, np.asarray(aux["expert_ids"])[:, :, i].reshape(t, -1))
    np.testing.assert_array_equal(ids[i], top)
  sim = sim_lib.calibration_similarity(model, tokens)
  assert sim.shape == (TINY.n_moe_layers, TINY.n_experts, TINY.n_experts)
  assert np.all(np.abs(sim) <= 1.0) and np.allclose(sim[:, range(8), range(8)], 1.0)


def test_rank_correlation():
  rng = np.random.default_rng(7)
  a = rng.random((6, 6))
  assert sim_lib.rank_correlation(a, a ** 3 + 1) == pytest.approx(1.0)
  assert sim_lib.rank_correlation(a, -a) == pytest.approx(-1.0)
  b = rng.random((6, 6))
  off = ~np.eye(6, dtype=bool)
  ra, rb = (np.argsort(np.argsort(m[off])) for m in (a, b))
  assert sim_lib.rank_correlation(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_errors_name_the_problem():
  g, u, w = _experts(np.random.default_rng(8))
  with pytest.raises(SimilarityError, match="unknown weight similarity kind"):
    sim_lib.weight_similarity(g, u, w, "cosine")
  with pytest.raises(SimilarityError, match=r"w_down must be \[E, f, d\]"):
    sim_lib.weight_similarity(g, u, w[:, :, :2])
  with pytest.raises(SimilarityError, match=r"\[T, d\]"):
    sim_lib.output_similarity(np.zeros((3, 5)), g, u, w)
  with pytest.raises(SimilarityError, match="E >= 3"):
    sim_lib.rank_correlation(np.eye(2), np.eye(2))
