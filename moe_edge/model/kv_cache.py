"""The KV cache of the MoE transformer: per-row fixed buffers with lengths.

Layout: for every decoder layer, ``keys`` and ``values`` ``[B, T, H_kv, D]`` (GQA: the cache
holds the ``H_kv`` key/value heads, not the ``H`` query heads), and one ``lengths [B] int32``
shared by the layers: row ``b`` holds positions ``0 .. lengths[b]-1``. ``T`` (the capacity,
default ``cfg.max_seq_len``) is fixed for the life of the cache.

Why per-row fixed buffers and not pages: the contexts here are short (``max_seq_len`` 256 for
``small_moe``) and a serving slot is reserved for one request from admission to finish (the
scheduler reserves prompt plus maximum output and never preempts), so a page table would add a
gather per layer and buy no memory back. The shapes never change with the context length, so
one compiled step serves every position: a decode step compiles once per batch size ``B``
(the engine's slot count) and chunk width ``C``.

Writing is a one-hot contraction (``[B, C, T] x [B, C, H_kv, D] -> [B, T, H_kv, D]``) rather
than a scatter: it is exact (each written entry is one value times one), keeps the batch axis
a pure batch axis (so a cache sharded by rows over the ``server`` mesh stays local), and new
tokens past ``valid`` are never written. Attention reads all ``T`` positions and masks those
after each query's own position, so a step costs the same at every position.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moe_edge.config import ModelConfig


class CacheError(ValueError):
  """A KV cache does not fit the model or the batch, or a request does not fit the cache."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One decoder layer's cache: ``keys, values [B, T, H_kv, D]`` (compute dtype)."""
  keys: jax.Array
  values: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Every layer's :class:`LayerCache` and the filled length of each row ``lengths [B]``."""
  layers: tuple[LayerCache, ...]
  lengths: jax.Array

  @property
  def batch(self) -> int:
    return int(self.lengths.shape[0])

  @property
  def capacity(self) -> int:
    """``T``: positions each row can hold."""
    return int(self.layers[0].keys.shape[1])

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, capacity: int | None = None,
           dtype=jnp.float32) -> "KVCache":
    """An empty cache of ``batch`` rows and ``capacity`` positions (default
    ``cfg.max_seq_len``) in ``dtype`` (the model's compute dtype)."""
    cap = cfg.max_seq_len if capacity is None else int(capacity)
    if batch < 1 or not 1 <= cap <= cfg.max_seq_len:
      raise CacheError(f"a KV cache needs batch >= 1 and 1 <= capacity <= max_seq_len "
                       f"({cfg.max_seq_len}); got batch={batch}, capacity={cap}.")
    shape = (batch, cap, cfg.n_kv_heads, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)
    return cls(tuple(LayerCache(zeros(), zeros()) for _ in range(cfg.n_layers)),
               jnp.zeros((batch,), jnp.int32))

  def nbytes_per_token(self) -> int:
    """Bytes one cached position costs over all layers (keys and values)."""
    k = self.layers[0].keys
    return 2 * len(self.layers) * int(math.prod(k.shape[2:])) * k.dtype.itemsize


def bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
  """KV-cache bytes of one position of ``cfg`` (all layers, keys and values)."""
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * int(dtype_bytes)


def check_cache(cache: KVCache, cfg: ModelConfig, batch: int) -> None:
  """Raise :class:`CacheError` unless ``cache`` has ``batch`` rows and ``cfg``'s layers and
  heads (static shapes only; works under ``jit``)."""
  if len(cache.layers) != cfg.n_layers:
    raise CacheError(f"the cache has {len(cache.layers)} layers, model {cfg.name!r} has "
                     f"{cfg.n_layers}; build it with KVCache.init(cfg, batch).")
  k = cache.layers[0].keys
  want = (batch, cfg.n_kv_heads, cfg.head_dim)
  if (k.shape[0], k.shape[2], k.shape[3]) != want or cache.lengths.shape != (batch,):
    raise CacheError(f"the cache is [B, T, H_kv, D] = {list(k.shape)} with lengths "
                     f"{list(cache.lengths.shape)}, but the step has B={batch} rows and the "
                     f"model H_kv={cfg.n_kv_heads}, D={cfg.head_dim}.")


def new_positions(lengths: jax.Array, num_new: jax.Array, width: int
                  ) -> tuple[jax.Array, jax.Array]:
  """``positions [B, C] int32`` (``lengths[b] + j``) and ``valid [B, C] bool``
  (``j < num_new[b]``) of a step feeding ``num_new [B]`` tokens per row in ``C = width``."""
  j = jnp.arange(width, dtype=jnp.int32)[None, :]
  return lengths.astype(jnp.int32)[:, None] + j, j < num_new.astype(jnp.int32)[:, None]


def write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
          valid: jax.Array) -> LayerCache:
  """Write the new ``k, v [B, C, H_kv, D]`` at ``positions [B, C]`` where ``valid [B, C]``."""
  t = cache.keys.shape[1]
  onehot = (positions[:, :, None] == jnp.arange(t)[None, None, :]) & valid[:, :, None]
  written = jnp.any(onehot, axis=1)[:, :, None, None]                   # [B, T, 1, 1]
  sel = onehot.astype(cache.keys.dtype)
  put = lambda new, old: jnp.where(
      written, jnp.einsum("bct,bchd->bthd", sel, new.astype(old.dtype),
                          precision=jax.lax.Precision.HIGHEST), old)
  return LayerCache(put(k, cache.keys), put(v, cache.values))


def attend(q: jax.Array, cache: LayerCache, positions: jax.Array) -> jax.Array:
  """Grouped-query attention of ``q [B, C, H, D]`` (at ``positions [B, C]``) over the cache:
  query ``(b, j)`` sees cached positions ``<= positions[b, j]``. Returns ``[B, C, H, D]``."""
  b, c, h, d = q.shape
  hkv = cache.keys.shape[2]
  t = cache.keys.shape[1]
  qg = q.reshape(b, c, hkv, h // hkv, d)
  scores = jnp.einsum("bcngk,btnk->bngct", qg, cache.keys, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  seen = jnp.arange(t)[None, None, :] <= positions[:, :, None]          # [B, C, T]
  scores = jnp.where(seen[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  o = jnp.einsum("bngct,btnk->bcngk", probs, cache.values)
  return o.reshape(b, c, h, d)
