"""Router: top-k routing and the load-balancing loss against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_edge.model import router
from moe_np_ref import route_np, softmax


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(top_k, norm):
  logits = np.random.default_rng(top_k).normal(size=(37, 8)).astype(np.float32)
  ids, gates = router.route(jnp.asarray(logits), top_k, norm)
  ref_ids, ref_gates = route_np(logits, top_k, norm)
  assert ids.dtype == jnp.int32 and gates.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(ids), ref_ids)
  np.testing.assert_allclose(np.asarray(gates), ref_gates, rtol=1e-6, atol=1e-7)


def test_norm_topk_equals_softmax_over_topk_logits():
  """Mixtral computes softmax over the top-k logits; renormalised top-k probs are the same."""
  logits = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
  ids, gates = router.route(jnp.asarray(logits), 2, True)
  top_logits = np.take_along_axis(logits, np.asarray(ids), axis=-1)
  np.testing.assert_allclose(np.asarray(gates), softmax(top_logits), rtol=1e-6)


def test_route_works_under_jit_with_leading_dims():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 8))
  ids, gates = jax.jit(lambda l: router.route(l, 2, False))(logits)
  ref_ids, ref_gates = route_np(np.asarray(logits).reshape(10, 8), 2, False)
  np.testing.assert_array_equal(np.asarray(ids).reshape(10, 2), ref_ids)
  np.testing.assert_allclose(np.asarray(gates).reshape(10, 2), ref_gates, rtol=1e-6)


def test_route_rejects_bad_top_k():
  with pytest.raises(router.RoutingError, match="top_k"):
    router.route(jnp.zeros((3, 4)), 5, True)


def test_check_finite_gates():
  router.check_finite_gates(np.ones((3, 2)))
  g = np.ones((3, 2))
  g[1, 0] = np.nan
  with pytest.raises(router.RoutingError, match=r"index \(1, 0\)"):
    router.check_finite_gates(g)


def test_load_balancing_loss_matches_numpy():
  rng = np.random.default_rng(1)
  t, e, k = 50, 6, 2
  probs = softmax(rng.normal(size=(t, e)))
  ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)])
  f = np.zeros(e)
  for row in ids:
    for x in row:
      f[x] += 1.0 / (t * k)
  ref = e * np.sum(f * probs.mean(0))
  got = router.load_balancing_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(ids), e)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_load_balancing_loss_extremes():
  """Uniform routing gives 1; every token on one expert with probability 1 gives E."""
  e = 4
  ids = np.arange(8)[:, None] % e
  uniform = router.load_balancing_loss(jnp.full((8, e), 1.0 / e), jnp.asarray(ids), e)
  np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)
  collapsed = router.load_balancing_loss(jnp.eye(e)[jnp.zeros(8, int)], jnp.zeros((8, 1), int), e)
  np.testing.assert_allclose(float(collapsed), e, rtol=1e-6)
