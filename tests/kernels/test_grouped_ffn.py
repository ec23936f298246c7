"""The grouped SwiGLU FFN on CPU (the ``lax`` backend) against a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_edge import kernels
from moe_edge.model import experts

D, F, G = 16, 8, 5


def _silu(a):
  return a / (1.0 + np.exp(-a))


def _numpy_ffn(x, sizes, wg, wu, wd):
  """float64 reference: group g's rows through expert g; rows past sum(sizes) are zero."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  out = np.zeros((x.shape[0], wd.shape[2]))
  start = 0
  for g, n in enumerate(np.asarray(sizes)):
    r = slice(start, start + n)
    out[r] = (_silu(x[r] @ wg[g]) * (x[r] @ wu[g])) @ wd[g]
    start += n
  return out


def _weights(seed, g=G):
  rng = np.random.default_rng(seed)
  wg, wu = (rng.normal(0, D ** -0.5, (g, D, F)).astype(np.float32) for _ in range(2))
  wd = rng.normal(0, F ** -0.5, (g, F, D)).astype(np.float32)
  return wg, wu, wd


@pytest.mark.parametrize("sizes", [[3, 0, 4, 0, 2], [0, 0, 0, 0, 0], [12, 0, 0, 0, 0]])
def test_equals_numpy_reference_fused_and_separate(sizes):
  rng = np.random.default_rng(len(sizes) + sum(sizes))
  rows = 12  # more rows than the groups own: the tail must come back zero
  x = rng.normal(size=(rows, D)).astype(np.float32)
  wg, wu, wd = _weights(sum(sizes))
  gs = jnp.asarray(sizes, jnp.int32)
  want = _numpy_ffn(x, sizes, wg, wu, wd)
  fused = kernels.grouped_ffn(jnp.asarray(x), gs, kernels.fuse_gate_up(wg, wu), jnp.asarray(wd))
  pair = kernels.grouped_ffn(jnp.asarray(x), gs, (jnp.asarray(wg), jnp.asarray(wu)),
                             jnp.asarray(wd), backend="lax")
  for got in (fused, pair):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
  assert not np.asarray(fused)[sum(sizes):].any()


def test_zero_rows():
  wg, wu, wd = _weights(0)
  y = kernels.grouped_ffn(jnp.zeros((0, D)), jnp.zeros((G,), jnp.int32), (wg, wu), wd)
  assert y.shape == (0, D)


def test_fuse_split_round_trip_and_bad_shapes():
  wg, wu, _ = _weights(1)
  fused = kernels.fuse_gate_up(wg, wu)
  assert fused.shape == (G, D, 2 * F)
  back = kernels.split_gate_up(fused)
  np.testing.assert_array_equal(back[0], wg)
  np.testing.assert_array_equal(back[1], wu)
  with pytest.raises(kernels.KernelError, match="differ"):
    kernels.fuse_gate_up(wg, wu[:, :, :-1])
  with pytest.raises(kernels.KernelError, match="even last axis"):
    kernels.split_gate_up(fused[..., :-1])


def test_bad_inputs_name_the_problem():
  wg, wu, wd = _weights(2)
  x, gs = jnp.ones((4, D)), jnp.asarray([4, 0, 0, 0, 0], jnp.int32)
  cases = [
      (dict(x=jnp.ones((4, D, 1))), "x must be"),
      (dict(w_in=(wg, wu[:, :, :-1])), "pair"),
      (dict(w_in=kernels.fuse_gate_up(wg, wu)[..., :-1]), "even last axis"),
      (dict(w_in=(wg[:, :-1], wu[:, :-1])), r"\[G, d=16"),
      (dict(w_down=wd[:, :, :-1]), "w_down must be"),
      (dict(group_sizes=gs[:-1]), "group_sizes must be"),
      (dict(group_sizes=gs.astype(jnp.float32)), "group_sizes must be"),
  ]
  for override, message in cases:
    args = dict(x=x, group_sizes=gs, w_in=(wg, wu), w_down=wd) | override
    with pytest.raises(kernels.KernelError, match=message):
      kernels.grouped_ffn(args["x"], args["group_sizes"], args["w_in"], args["w_down"])


def test_backend_choice_on_cpu():
  assert kernels.select_backend(jnp.bfloat16) == "lax"
  assert kernels.select_backend(jnp.float32, "auto") == "lax"
  assert "not a GPU" in kernels.mosaic_unavailable(jnp.bfloat16)
  with pytest.raises(kernels.KernelError, match="'mosaic' cannot run: the default device is cpu"):
    kernels.select_backend(jnp.bfloat16, "mosaic")
  with pytest.raises(kernels.KernelError, match="unknown grouped-FFN backend 'triton'"):
    kernels.select_backend(jnp.bfloat16, "triton")
  with pytest.raises(kernels.KernelError, match="unknown grouped-FFN backend"):
    with kernels.ffn_backend("cuda"):
      pass
  with kernels.ffn_backend("mosaic"):  # the override reaches calls without backend=
    with pytest.raises(kernels.KernelError, match="'mosaic' cannot run"):
      kernels.select_backend(jnp.bfloat16)
  assert kernels.select_backend(jnp.bfloat16) == "lax"


def test_sort_by_group_skips_out_of_range_keys():
  order, sizes = kernels.sort_by_group(jnp.asarray([2, -1, 0, 2, 7, 0], jnp.int32), 3)
  np.testing.assert_array_equal(sizes, [2, 0, 2])
  np.testing.assert_array_equal(order, [2, 5, 0, 3, 1, 4])


def test_moe_grouped_equals_dense_reference():
  rng = np.random.default_rng(3)
  t, k, e = 9, 2, G
  x = jnp.asarray(rng.normal(size=(t, D)).astype(np.float32))
  ids = rng.integers(0, e, (t, k)).astype(np.int32)
  ids[0, 1] = ids[0, 0]   # one expert picked twice counts twice
  ids[1, 0] = e           # an out-of-range id contributes zero in both
  gates = jnp.asarray(rng.random((t, k)).astype(np.float32))
  wg, wu, wd = (jnp.asarray(w) for w in _weights(4))
  ref = experts.moe_dense_reference(x, jnp.asarray(ids), gates, wg, wu, wd)
  got = jax.jit(experts.moe_grouped)(x, jnp.asarray(ids), gates, wg, wu, wd)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)
  # The model's default on CPU is the dense reference itself (recorded results stay identical).
  same = experts.routed_experts(x, jnp.asarray(ids), gates, wg, wu, wd)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(ref))


def test_mosaic_config_policy():
  # The block sizes follow the rows only: the same kernel whatever the slots held.
  assert kernels.mosaic_config(64, 16) is None and kernels.mosaic_config(64, 96) is None
  assert kernels.mosaic_config(4096, 16) == kernels.mosaic_config(4096, 96)
  assert kernels.mosaic_config(4096, 16).block_m == 128
