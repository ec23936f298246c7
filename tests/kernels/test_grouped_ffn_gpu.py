"""The grouped FFN's backends on a GPU: Mosaic (tokamax) against lax and a float64 reference.

Skipped without a GPU. Run on one with the CPU as a second platform (the model check compares
against the CPU's forward)::

  JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/kernels/test_grouped_ffn_gpu.py
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_edge import kernels
from moe_edge.model.checkpoint import restore_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _gpu():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = pytest.mark.skipif(not _gpu(), reason="needs a GPU (JAX_PLATFORMS=cuda,cpu)")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _reference(x, sizes, wgu, wd):
  x, wgu, wd = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, wgu, wd))
  f = wd.shape[1]
  out, start = np.zeros((x.shape[0], wd.shape[2])), 0
  for g, n in enumerate(sizes):
    h = x[start:start + n] @ wgu[g]
    out[start:start + n] = (h[:, :f] / (1 + np.exp(-h[:, :f])) * h[:, f:]) @ wd[g]
    start += n
  return out


@pytest.mark.parametrize("rows,d,f,sizes", [
    (64, 256, 128, [8, 0, 0, 24, 0, 1, 0, 0]),        # decode-like, empty groups, unused tail
    (512, 512, 256, [200, 0, 56, 100, 0, 0, 0, 150]),  # prefill-like, blocks across groups
    (40, 256, 128, [0] * 6),                           # no real row at all
])
def test_mosaic_equals_lax_and_reference(rows, d, f, sizes):
  if kernels.mosaic_unavailable(jnp.bfloat16):
    pytest.skip(kernels.mosaic_unavailable(jnp.bfloat16))
  key = jax.random.key(rows + d)
  kx, kg, kd = jax.random.split(key, 3)
  g = len(sizes)
  x = jax.random.normal(kx, (rows, d), jnp.bfloat16)
  wgu = (jax.random.normal(kg, (g, d, 2 * f)) * d ** -0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(kd, (g, f, d)) * f ** -0.5).astype(jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  ref = _reference(x, sizes, wgu, wd)
  fn = jax.jit(kernels.grouped_ffn, static_argnames=("backend",))
  mosaic, lax = fn(x, gs, wgu, wd, backend="mosaic"), fn(x, gs, wgu, wd, backend="lax")
  split = jax.jit(lambda *a: kernels.grouped_ffn(a[0], a[1], kernels.split_gate_up(a[2]), a[3],
                                                 backend="mosaic"))(x, gs, wgu, wd)
  for got in (mosaic, lax, split):
    assert np.isfinite(np.asarray(got, np.float32)).all()
    if sum(sizes):
      assert _rel(got, ref) < 1e-2
  assert not np.asarray(mosaic, np.float32)[sum(sizes):].any()  # rows no group owns: zero
  assert _rel(mosaic, lax) < 1e-2 or not sum(sizes)


def test_auto_picks_mosaic_on_hopper_bf16():
  why = kernels.mosaic_unavailable(jnp.bfloat16)
  assert kernels.select_backend(jnp.bfloat16) == ("lax" if why else "mosaic")
  assert kernels.select_backend(jnp.float32) == "lax"  # the Mosaic kernel takes bf16/fp16 only


def test_model_forward_equals_cpu_reference():
  """The trained small_moe in bf16 on the GPU (grouped FFN: Mosaic on Hopper) against the CPU.

  Reference: the CPU's float32 forward. The GPU's bf16 forward must be as close to it as the
  CPU's own bf16 forward (dense experts) is, give or take 50%: bf16 rounding alone moves the
  logits by a few percent, so a wrong kernel shows as a much larger error.
  """
  cpu, gpu = jax.devices("cpu")[0], _gpu()[0]
  ckpt = REPO / "checkpoints" / "small_moe" / "final"
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 64)).astype(np.int32))
  forward = jax.jit(lambda m, t: m(t)[0])

  def logits(dev, dtype):
    with jax.default_device(dev):
      model, _, _ = restore_checkpoint(ckpt, dtype=dtype)
      return np.asarray(forward(model, jax.device_put(tokens, dev)), np.float64)

  with jax.default_device(gpu):
    on_gpu = kernels.select_backend(jnp.bfloat16)
  ref, cpu16, gpu16 = logits(cpu, jnp.float32), logits(cpu, jnp.bfloat16), logits(gpu, jnp.bfloat16)
  err_cpu, err_gpu = _rel(cpu16, ref), _rel(gpu16, ref)
  print(f"grouped FFN backend on the GPU: {on_gpu}; logits rel. error vs CPU float32: GPU bf16 "
        f"{err_gpu:.4f}, CPU bf16 {err_cpu:.4f}")
  assert err_gpu < 1.5 * err_cpu
  assert (gpu16.argmax(-1) == ref.argmax(-1)).mean() > 0.95
