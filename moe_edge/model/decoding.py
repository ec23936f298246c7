"""Generation with the KV cache on one device (the reference the serving engine must equal).

:func:`generate_cached` prefills every prompt (ragged lengths allowed, in chunks of
``prefill_chunk`` positions) with :func:`cached_step`, compiled once per ``(B, C)`` (batch rows,
chunk width), then runs every decode step inside one compiled loop (:func:`_decode_program`,
``jax.lax.fori_loop`` with a traced trip count: compiled once per batch size, for any number of
new tokens), so no host round trip is paid per token.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_edge.model import experts as experts_lib
from moe_edge.model.kv_cache import KVCache
from moe_edge.model.transformer import ModelError, MoeFn, MoETransformer


def sparse_moe_fn(layer: int, x: jax.Array, expert_ids: jax.Array, gates: jax.Array,
                  w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Single-device routed experts that read only the chosen experts' weights when that is less
  work: for ``T * k < E`` token-choices (decode of a few rows) every choice gathers its
  expert's ``[d, f]`` matrices; otherwise :func:`moe_edge.model.experts.moe_dense_reference`.
  Same sum ``sum_r gates[t, r] FFN_{e_r}(x_t)``; the rounding order differs from the dense
  reference's in the last bits. ``x [B, S, d]``, ``expert_ids, gates [B, S, k]``,
  ``w_gate, w_up [E, d, f]``, ``w_down [E, f, d]`` -> ``[B, S, d]``."""
  del layer
  b, s, d = x.shape
  k = expert_ids.shape[-1]
  xt, ids, g = x.reshape(b * s, d), expert_ids.reshape(b * s, k), gates.reshape(b * s, k)
  if b * s * k >= w_gate.shape[0]:
    return experts_lib.moe_dense_reference(xt, ids, g, w_gate, w_up, w_down).reshape(b, s, d)
  h = (jax.nn.silu(jnp.einsum("td,tkdf->tkf", xt, w_gate[ids])) *
       jnp.einsum("td,tkdf->tkf", xt, w_up[ids]))
  y = jnp.einsum("tkf,tkfd->tkd", h, w_down[ids])
  return jnp.einsum("tk,tkd->td", g.astype(y.dtype), y).reshape(b, s, d)


def last_logits(logits: jax.Array, num_new: jax.Array) -> jax.Array:
  """``[B, V]``: each row's logits at its last new token (``num_new - 1``, clipped to 0).
  ``logits [B, C, V]``, ``num_new [B]``."""
  idx = jnp.maximum(num_new.astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


def pick_token(last: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
  """Greedy (``temperature == 0``) or sampled next token ``[B] int32`` from ``last [B, V]``."""
  if temperature > 0:
    return jax.random.categorical(key, last / temperature, axis=-1).astype(jnp.int32)
  return jnp.argmax(last, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def cached_step(moe_fn: MoeFn | None, temperature: float):
  """Jitted ``(model, tokens [B, C], num_new [B], cache, key) -> (next [B] int32, cache)``:
  one :meth:`MoETransformer.step` and the token after each row's last new token."""

  @nnx.jit
  def step(model, tokens, num_new, cache, key):
    logits, _, cache = model.step(tokens, cache, num_new, moe_fn=moe_fn)
    return pick_token(last_logits(logits, num_new), temperature, key), cache

  return step


@functools.lru_cache(maxsize=32)
def _decode_program(graphdef, moe_fn: MoeFn | None, temperature: float):
  """Jitted ``(state, first [B], cache, steps, key) -> tokens [B, T]``: token 0 is ``first``,
  tokens ``1 .. steps-1`` are decoded one position per loop iteration (the rest stay 0)."""

  def run(state, first, cache, steps, key):
    model = nnx.merge(graphdef, state)
    b, t = first.shape[0], cache.capacity
    buf = jnp.zeros((b, t), jnp.int32).at[:, 0].set(first)

    def body(j, carry):
      buf, cache, key = carry
      key, sub = jax.random.split(key)
      tok = jax.lax.dynamic_slice_in_dim(buf, j - 1, 1, axis=1)
      logits, _, cache = model.step(tok, cache, None, moe_fn=moe_fn)
      nxt = pick_token(logits[:, 0], temperature, sub)
      return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], j, axis=1), cache, key

    buf, _, _ = jax.lax.fori_loop(1, steps, body, (buf, cache, key))
    return buf

  return jax.jit(run)


def _rows(prompts) -> list[np.ndarray]:
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ModelError(f"prompts must be [B, S0] or a list of 1-D token arrays, got shape "
                       f"{arr.shape}.")
    return list(arr)
  return [np.asarray(p) for p in prompts]


def generate_cached(model: MoETransformer, prompts: Sequence | np.ndarray, max_new: int,
                    temperature: float = 0.0, rng: jax.Array | None = None,
                    moe_fn: MoeFn | None = None, prefill_chunk: int | None = None
                    ) -> np.ndarray:
  """Generate ``max_new`` tokens after each prompt, with the KV cache.

  Args:
    model: the model.
    prompts: ``[B, S0]`` int, or ``B`` 1-D int arrays of different lengths (ragged).
    max_new: new tokens per prompt (``>= 1``); prompt length + ``max_new`` must fit
      ``cfg.max_seq_len``.
    temperature: 0 is greedy; otherwise sampled with ``rng`` (required).
    moe_fn: routed-expert compute (see :mod:`moe_edge.model.transformer`); default
      :func:`sparse_moe_fn` (reads only the chosen experts in decode steps).
    prefill_chunk: positions per prefill step (default: the longest prompt, one step).

  Returns:
    ``[B, max_new] int32``: the generated tokens (prompts not included).
  """
  cfg = model.cfg
  moe_fn = sparse_moe_fn if moe_fn is None else moe_fn
  rows = _rows(prompts)
  if not rows:
    raise ModelError("generate_cached needs at least one prompt.")
  if max_new < 1:
    raise ModelError(f"max_new must be >= 1, got {max_new}.")
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ModelError("temperature must be >= 0, and sampling (> 0) needs an rng key.")
  lens = np.array([r.size for r in rows])
  for i, r in enumerate(rows):
    if r.ndim != 1 or r.size < 1 or not np.issubdtype(r.dtype, np.integer):
      raise ModelError(f"prompt {i} must be a non-empty 1-D array of token ids, got shape "
                       f"{r.shape} and dtype {r.dtype}.")
    if r.size + max_new > cfg.max_seq_len:
      raise ModelError(f"prompt {i} ({r.size} tokens) + max_new ({max_new}) exceeds "
                       f"max_seq_len={cfg.max_seq_len} of {cfg.name!r}; shorten it.")
  chunk = int(lens.max()) if prefill_chunk is None else int(prefill_chunk)
  if chunk < 1:
    raise ModelError(f"prefill_chunk must be >= 1, got {prefill_chunk}.")
  b = len(rows)
  width = -(-int(lens.max()) // chunk) * chunk
  buf = np.zeros((b, width), np.int32)
  for i, r in enumerate(rows):
    buf[i, :r.size] = r
  step = cached_step(moe_fn, float(temperature))
  rng = jax.random.key(0) if rng is None else rng
  cache = KVCache.init(cfg, b, dtype=model.dtype)
  out = np.zeros((b, max_new), np.int32)
  for start in range(0, width, chunk):
    num_new = np.clip(lens - start, 0, chunk).astype(np.int32)
    rng, key = jax.random.split(rng)
    nxt, cache = step(model, jnp.asarray(buf[:, start:start + chunk]), jnp.asarray(num_new),
                      cache, key)
    done = (lens > start) & (lens <= start + chunk)  # prompts whose last chunk this was
    out[done, 0] = np.asarray(nxt)[done]
  if max_new > 1:
    graphdef, state = nnx.split(model)
    rng, key = jax.random.split(rng)
    buf = _decode_program(graphdef, moe_fn, float(temperature))(
        state, jnp.asarray(out[:, 0]), cache, jnp.int32(max_new), key)
    out = np.asarray(buf[:, :max_new])
  return out
