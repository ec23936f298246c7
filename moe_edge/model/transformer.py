"""Decoder-only MoE transformer in Flax nnx.

Layer: ``RMSNorm -> attention (RoPE, GQA, causal) -> residual -> RMSNorm -> FFN -> residual``,
where the FFN is a dense SwiGLU for the first ``cfg.first_dense_layers`` layers (DeepSeek) and an
MoE block (top-k routed experts plus optional shared experts) otherwise. Conventions follow the
Hugging Face Llama / Mixtral code (``rotate_half`` RoPE, ``x * rsqrt(mean(x^2) + eps) * w``
RMSNorm, GQA head ``h`` reading KV head ``h // (H / H_kv)``), so imported checkpoints match.

Shapes: ``B`` batch, ``S`` sequence, ``d`` model size, ``V`` vocabulary, ``E`` experts, ``k`` top-k,
``f`` expert FFN size, ``L = cfg.n_moe_layers`` MoE layers (the index traces and placements use).

Two hooks make the model usable for placement research:

* ``routing``: replay recorded routing. The router still runs (its probabilities feed the aux
  loss) but the expert choice *and the gate weights* come from the override.
* ``moe_fn``: replace the local routed-expert compute, e.g. by the distributed dispatch of
  ``moe_edge.parallel``. Signature ``moe_fn(layer, x [B,S,d], expert_ids [B,S,k], gates [B,S,k],
  w_gate [E,d,f], w_up [E,d,f], w_down [E,f,d]) -> [B,S,d]`` with ``layer`` the MoE-layer index
  ``0..L-1``. The default is :func:`moe_edge.model.experts.routed_experts` (grouped on a
  Hopper GPU, the dense reference elsewhere).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_edge.config import ModelConfig
from moe_edge.core.errors import MoeEdgeError
from moe_edge.model import experts as experts_lib
from moe_edge.model import kv_cache as kv_lib
from moe_edge.model import router as router_lib

MoeFn = Callable[..., jax.Array]
Routing = Optional[tuple[jax.Array, jax.Array]]


class ModelError(MoeEdgeError):
  """Model inputs do not fit the model (wrong shapes, dtypes or lengths)."""


class RoutingInfo(NamedTuple):
  """What one MoE block decided. ``expert_ids [B,S,k] int32``, ``gates [B,S,k] f32``,
  ``router_probs [B,S,E] f32`` (softmax over all experts), ``aux_loss`` scalar."""
  expert_ids: jax.Array
  gates: jax.Array
  router_probs: jax.Array
  aux_loss: jax.Array


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * scale``, computed in float32. ``scale [d]``."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (Hugging Face ``rotate_half`` layout). ``x [B,S,H,D]``, ``positions [S]``
  (shared by every row) or ``[B, S]`` (per row, e.g. after a KV cache of per-row lengths)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1])  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) S, D/2]
  if angles.ndim == 2:
    angles = angles[None]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query attention with RoPE.

  Params: ``wq [d, H, D]``, ``wk [d, H_kv, D]``, ``wv [d, H_kv, D]``, ``wo [H, D, d]``.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    d, h, hkv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, hd
    self.rope_theta = cfg.rope_theta
    self.dtype = dtype
    std_in, std_out = d ** -0.5, (h * hd) ** -0.5 / math.sqrt(2 * cfg.n_layers)
    self.wq = _param(rngs, (d, h, hd), std_in, param_dtype)
    self.wk = _param(rngs, (d, hkv, hd), std_in, param_dtype)
    self.wv = _param(rngs, (d, hkv, hd), std_in, param_dtype)
    self.wo = _param(rngs, (h, hd, d), std_out, param_dtype)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """Projections with RoPE at ``positions`` (``[S]`` or ``[B, S]``): ``q [B,S,H,D]``,
    ``k, v [B,S,H_kv,D]`` in the compute dtype."""
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
    return (apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta),
            v)

  def _out(self, o: jax.Array) -> jax.Array:
    """``o [B, S, H, D]`` -> ``[B, S, d]``."""
    return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(self.dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, S, d]`` -> ``[B, S, d]``."""
    b, s, _ = x.shape
    dt = self.dtype
    q, k, v = self._qkv(x, jnp.arange(s))
    groups = self.n_heads // self.n_kv_heads
    q = q.reshape(b, s, self.n_kv_heads, groups, self.head_dim)
    scores = jnp.einsum("bsngk,btnk->bngst", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum("bngst,btnk->bsngk", probs, v).reshape(b, s, self.n_heads, self.head_dim)
    return self._out(o)

  def cached(self, x: jax.Array, layer_cache: kv_lib.LayerCache, positions: jax.Array,
             valid: jax.Array) -> tuple[jax.Array, kv_lib.LayerCache]:
    """Attention of new tokens over a KV cache (:mod:`moe_edge.model.kv_cache`).

    ``x [B, C, d]``: up to ``C`` new tokens per row at ``positions [B, C]`` (row ``b``'s next
    free cache positions), ``valid [B, C]`` which of them are real. Their keys/values are
    written into the cache, then every new token attends to the row's cached positions up to
    its own. Returns ``([B, C, d], updated layer cache)``.
    """
    q, k, v = self._qkv(x, positions)
    layer_cache = kv_lib.write(layer_cache, k, v, positions, valid)
    o = kv_lib.attend(q, layer_cache, positions)
    return self._out(o), layer_cache


class MLP(nnx.Module):
  """Dense SwiGLU FFN. ``w_gate/w_up [d, f]``, ``w_down [f, d]``."""

  def __init__(self, d: int, f: int, n_layers: int, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.dtype = dtype
    self.w_gate = _param(rngs, (d, f), d ** -0.5, param_dtype)
    self.w_up = _param(rngs, (d, f), d ** -0.5, param_dtype)
    self.w_down = _param(rngs, (f, d), f ** -0.5 / math.sqrt(2 * n_layers), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, S, d]`` -> ``[B, S, d]``."""
    b, s, d = x.shape
    dt = self.dtype
    y = experts_lib.expert_ffn(x.reshape(b * s, d).astype(dt), self.w_gate[...].astype(dt),
                               self.w_up[...].astype(dt), self.w_down[...].astype(dt))
    return y.reshape(b, s, d)


class MoEBlock(nnx.Module):
  """Routed experts plus optional shared experts.

  Params: ``w_router [d, E]``; ``w_gate, w_up [E, d, f]``, ``w_down [E, f, d]``; with shared
  experts ``shared_w_gate, shared_w_up [d, F]``, ``shared_w_down [F, d]`` where
  ``F = n_shared_experts * d_ff_shared`` (the shared experts concatenated into one FFN), and
  with ``cfg.shared_expert_gate`` also ``w_shared_gate [d, 1]`` (Qwen-MoE sigmoid gate).
  The router runs in float32 whatever the compute dtype.
  """

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    d, e, f = cfg.d_model, cfg.n_experts, cfg.d_ff_expert
    self.layer = layer
    self.n_experts, self.top_k, self.norm_topk_prob = e, cfg.top_k, cfg.norm_topk_prob
    self.dtype = dtype
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    self.w_router = _param(rngs, (d, e), d ** -0.5, param_dtype)
    self.w_gate = _param(rngs, (e, d, f), d ** -0.5, param_dtype)
    self.w_up = _param(rngs, (e, d, f), d ** -0.5, param_dtype)
    self.w_down = _param(rngs, (e, f, d), f ** -0.5 * out_scale, param_dtype)
    self.has_shared = cfg.n_shared_experts > 0
    self.has_shared_gate = self.has_shared and cfg.shared_expert_gate
    if self.has_shared:
      fs = cfg.n_shared_experts * cfg.d_ff_shared
      self.shared_w_gate = _param(rngs, (d, fs), d ** -0.5, param_dtype)
      self.shared_w_up = _param(rngs, (d, fs), d ** -0.5, param_dtype)
      self.shared_w_down = _param(rngs, (fs, d), fs ** -0.5 * out_scale, param_dtype)
    if self.has_shared_gate:
      self.w_shared_gate = _param(rngs, (d, 1), d ** -0.5, param_dtype)

  def __call__(self, x: jax.Array, routing: Routing = None,
               moe_fn: MoeFn | None = None) -> tuple[jax.Array, RoutingInfo]:
    """``x [B, S, d]`` -> ``(y [B, S, d], RoutingInfo)``.

    ``routing``: optional ``(expert_ids [B,S,k], gates [B,S,k])`` used instead of the router's
    choice (trace replay); the gates then come from the override too. ``moe_fn``: see module doc.
    """
    b, s, d = x.shape
    dt = self.dtype
    logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32),
                        self.w_router[...].astype(jnp.float32))
    probs = router_lib.router_probs(logits)
    if routing is None:
      expert_ids, gates = router_lib.route(logits, self.top_k, self.norm_topk_prob)
    else:
      expert_ids, gates = routing
      if (expert_ids.ndim != 3 or expert_ids.shape[:2] != (b, s) or
          gates.shape != expert_ids.shape):
        raise ModelError(
            f"MoE layer {self.layer}: routing override must be (expert_ids [B,S,k], gates "
            f"[B,S,k]) with [B,S] = [{b},{s}]; got shapes {expert_ids.shape} and {gates.shape}.")
      expert_ids = expert_ids.astype(jnp.int32)
      gates = gates.astype(jnp.float32)
    aux_loss = router_lib.load_balancing_loss(probs.reshape(b * s, -1),
                                              expert_ids.reshape(b * s, -1), self.n_experts)
    w_gate, w_up, w_down = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                            self.w_down[...].astype(dt))
    xd = x.astype(dt)
    if moe_fn is None:
      k = expert_ids.shape[-1]
      y = experts_lib.routed_experts(xd.reshape(b * s, d), expert_ids.reshape(b * s, k),
                                     gates.reshape(b * s, k), w_gate, w_up, w_down)
      y = y.reshape(b, s, d)
    else:
      y = moe_fn(self.layer, xd, expert_ids, gates, w_gate, w_up, w_down)
      if y.shape != (b, s, d):
        raise ModelError(f"moe_fn returned shape {y.shape} for MoE layer {self.layer}; it must "
                         f"return [B, S, d] = {(b, s, d)}.")
      y = y.astype(dt)
    if self.has_shared:
      gate_w = self.w_shared_gate[...].astype(dt) if self.has_shared_gate else None
      ys = experts_lib.shared_expert_ffn(xd.reshape(b * s, d), self.shared_w_gate[...].astype(dt),
                                         self.shared_w_up[...].astype(dt),
                                         self.shared_w_down[...].astype(dt), gate_w)
      y = y + ys.reshape(b, s, d)
    return y, RoutingInfo(expert_ids, gates, probs, aux_loss)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer; ``ffn`` is an :class:`MLP` (dense layer) or a :class:`MoEBlock`."""

  def __init__(self, cfg: ModelConfig, index: int, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.index = index
    self.is_moe = index >= cfg.first_dense_layers
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    self.attn = Attention(cfg, rngs, dtype, param_dtype)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    if self.is_moe:
      self.ffn = MoEBlock(cfg, index - cfg.first_dense_layers, rngs, dtype, param_dtype)
    else:
      self.ffn = MLP(cfg.d_model, cfg.d_ff_dense, cfg.n_layers, rngs, dtype, param_dtype)

  def __call__(self, x: jax.Array, routing: Routing = None, moe_fn: MoeFn | None = None
               ) -> tuple[jax.Array, RoutingInfo | None]:
    """``x [B, S, d]`` (float32 residual stream) -> ``(x', RoutingInfo or None)``."""
    x = x + self.attn(self.attn_norm(x)).astype(x.dtype)
    return self._ffn(x, routing, moe_fn)

  def cached(self, x: jax.Array, layer_cache: kv_lib.LayerCache, positions: jax.Array,
             valid: jax.Array, moe_fn: MoeFn | None = None
             ) -> tuple[jax.Array, RoutingInfo | None, kv_lib.LayerCache]:
    """:meth:`__call__` with cached attention (see :meth:`Attention.cached`)."""
    a, layer_cache = self.attn.cached(self.attn_norm(x), layer_cache, positions, valid)
    y, info = self._ffn(x + a.astype(x.dtype), None, moe_fn)
    return y, info, layer_cache

  def _ffn(self, x: jax.Array, routing: Routing, moe_fn: MoeFn | None):
    h = self.ffn_norm(x)
    if self.is_moe:
      y, info = self.ffn(h, routing=routing, moe_fn=moe_fn)
    else:
      y, info = self.ffn(h), None
    return x + y.astype(x.dtype), info


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class MoETransformer(nnx.Module):
  """Decoder-only MoE language model for a :class:`ModelConfig`.

  Params: ``embed [V, d]``, ``layers[i]`` (:class:`DecoderLayer`), ``final_norm``, and
  ``lm_head [d, V]`` unless ``cfg.tie_embeddings`` (then logits use ``embed.T``).
  ``dtype`` is the compute dtype of the matmuls; parameters are stored in ``param_dtype``;
  router, norms, softmaxes, the residual stream and the logits stay in float32.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    d, v = cfg.d_model, cfg.vocab_size
    self.embed = _param(rngs, (v, d), d ** -0.5 if cfg.tie_embeddings else 1.0, param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs, dtype, param_dtype)
                            for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(d, cfg.norm_eps, param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (d, v), d ** -0.5, param_dtype)

  def moe_blocks(self) -> list[MoEBlock]:
    """The ``L`` MoE blocks in order (MoE-layer index ``l`` = ``moe_blocks()[l].layer``)."""
    return [layer.ffn for layer in self.layers if layer.is_moe]

  def __call__(self, tokens: jax.Array, routing: Routing = None,
               moe_fn: MoeFn | None = None) -> tuple[jax.Array, dict]:
    """Next-token logits.

    Args:
      tokens: ``[B, S]`` int token ids, ``S <= cfg.max_seq_len``.
      routing: optional ``(expert_ids [B,S,L,k], gates [B,S,L,k])`` replayed instead of the
        router's choices (gates included).
      moe_fn: optional routed-expert compute (see module doc).

    Returns:
      ``logits [B, S, V] float32`` and ``aux``: ``{"expert_ids": [B,S,L,k] int32, "gates":
      [B,S,L,k] f32, "aux_loss": scalar}`` (aux_loss = mean over MoE layers of the
      load-balancing loss).
    """
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ModelError(f"tokens must be [B, S], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ModelError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    b, s = tokens.shape
    if s > cfg.max_seq_len:
      raise ModelError(f"sequence length {s} exceeds cfg.max_seq_len={cfg.max_seq_len} of "
                       f"model {cfg.name!r}; shorten the input or use a longer-context config.")
    n_moe = cfg.n_moe_layers
    if routing is not None:
      r_ids, r_gates = routing
      if r_ids.ndim != 4 or r_ids.shape[:3] != (b, s, n_moe) or r_gates.shape != r_ids.shape:
        raise ModelError(
            f"routing must be (expert_ids [B,S,L,k], gates [B,S,L,k]) with [B,S,L] = "
            f"[{b},{s},{n_moe}]; got {tuple(r_ids.shape)} and {tuple(r_gates.shape)}.")
    x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
    infos = []
    for layer in self.layers:
      layer_routing = None
      if routing is not None and layer.is_moe:
        l = layer.ffn.layer
        layer_routing = (r_ids[:, :, l], r_gates[:, :, l])
      x, info = layer(x, routing=layer_routing, moe_fn=moe_fn)
      if info is not None:
        infos.append(info)
    return self._logits(x), _aux(infos)

  def step(self, tokens: jax.Array, cache: kv_lib.KVCache, num_new: jax.Array | None = None,
           moe_fn: MoeFn | None = None) -> tuple[jax.Array, dict, kv_lib.KVCache]:
    """One cached step: prefill (a chunk of a prompt) or decode, per row.

    Row ``b`` feeds its next ``num_new[b]`` tokens ``tokens[b, :num_new[b]]`` at positions
    ``cache.lengths[b] + 0..num_new[b]-1``; the rest of the row is padding (computed, never
    written to the cache; a ``moe_fn`` should mask it, see :func:`kv_cache.new_positions`).
    The caller keeps ``cache.lengths + num_new <= cache.capacity`` (a jitted step cannot
    check it; :func:`kv_cache.generate_cached` and the serving scheduler do).

    Args:
      tokens: ``[B, C]`` int token ids (``C >= 1``; ``C = 1`` is a decode step).
      cache: the :class:`~moe_edge.model.kv_cache.KVCache` of these ``B`` rows.
      num_new: ``[B]`` int, ``0 <= num_new <= C`` (default ``C`` for every row).
      moe_fn: optional routed-expert compute (module doc).

    Returns:
      ``logits [B, C, V] float32`` (position ``j`` predicts the token after new token ``j``),
      ``aux`` as in :meth:`__call__`, and the cache with the new keys/values and lengths.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ModelError(f"tokens must be [B, C] with C >= 1, got shape {tokens.shape}.")
    b, c = tokens.shape
    kv_lib.check_cache(cache, self.cfg, b)
    num_new = jnp.full((b,), c, jnp.int32) if num_new is None else num_new
    positions, valid = kv_lib.new_positions(cache.lengths, num_new, c)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
    infos, layers = [], []
    for layer, layer_cache in zip(self.layers, cache.layers):
      x, info, layer_cache = layer.cached(x, layer_cache, positions, valid, moe_fn=moe_fn)
      layers.append(layer_cache)
      if info is not None:
        infos.append(info)
    new_cache = kv_lib.KVCache(tuple(layers), cache.lengths + num_new.astype(jnp.int32))
    return self._logits(x), _aux(infos), new_cache

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and head: ``x [B, S, d]`` -> ``logits [B, S, V] float32``."""
    x = self.final_norm(x)
    dt = self.dtype
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.einsum("bsd,dv->bsv", x.astype(dt), head.astype(dt),
                      preferred_element_type=jnp.float32)


def _aux(infos: list[RoutingInfo]) -> dict:
  """``{"expert_ids": [B,S,L,k], "gates": [B,S,L,k], "aux_loss": scalar}`` of the MoE blocks."""
  return {
      "expert_ids": jnp.stack([i.expert_ids for i in infos], axis=2),
      "gates": jnp.stack([i.gates for i in infos], axis=2),
      "aux_loss": jnp.mean(jnp.stack([i.aux_loss for i in infos])),
  }


# --------------------------------------------------------------------------------------------
# Helpers on a model
# --------------------------------------------------------------------------------------------
def expert_weights(model: MoETransformer) -> dict[str, jax.Array]:
  """Routed-expert weights of all MoE layers, stacked: ``w_gate, w_up [L, E, d, f]``,
  ``w_down [L, E, f, d]`` (for the distributed dispatch and for migration)."""
  blocks = model.moe_blocks()
  return {name: jnp.stack([getattr(b, name)[...] for b in blocks])
          for name in ("w_gate", "w_up", "w_down")}


def token_losses(model: MoETransformer, tokens: jax.Array, moe_fn: MoeFn | None = None
                 ) -> tuple[jax.Array, dict]:
  """Per-position next-token negative log-likelihood (nats).

  ``tokens [B, S+1]`` -> ``(nll [B, S] float32, aux)`` where position ``t`` predicts
  ``tokens[:, t+1]`` from ``tokens[:, :t+1]``.
  """
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ModelError(f"tokens must be [B, S+1] with S >= 1, got shape {tokens.shape}.")
  logits, aux = model(tokens[:, :-1], moe_fn=moe_fn)
  targets = tokens[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked, aux


def lm_loss(model: MoETransformer, tokens: jax.Array, moe_fn: MoeFn | None = None
            ) -> tuple[jax.Array, dict]:
  """Training loss ``mean NLL + cfg.aux_loss_coef * aux_loss`` on ``tokens [B, S+1]``.

  Returns ``(loss, metrics)`` with metrics ``{"loss", "nll", "aux_loss"}`` (scalars; ``nll`` in
  nats per token).
  """
  nll, aux = token_losses(model, tokens, moe_fn=moe_fn)
  mean_nll = jnp.mean(nll)
  loss = mean_nll + model.cfg.aux_loss_coef * aux["aux_loss"]
  return loss, {"loss": loss, "nll": mean_nll, "aux_loss": aux["aux_loss"]}


def generate(model: MoETransformer, prompt_tokens: jax.Array, max_new: int,
             temperature: float = 0.0, rng: jax.Array | None = None,
             moe_fn: MoeFn | None = None) -> jax.Array:
  """Sample ``max_new`` tokens after ``prompt_tokens [B, S0]``; returns ``[B, S0 + max_new]``.

  No KV cache: every step re-runs the model on a fixed ``[B, S0 + max_new]`` buffer (causal
  masking makes the not-yet-written tail irrelevant), so one compiled forward (cached per
  ``moe_fn`` and temperature) serves all steps at ``O(max_new)`` full forwards of cost. It is
  the cache-free reference; :func:`moe_edge.model.kv_cache.generate_cached` is the fast path.
  ``temperature == 0`` is greedy; otherwise sample from ``softmax(logits / temperature)`` with
  ``rng`` (required).
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
    raise ModelError(f"prompt_tokens must be [B, S0] with S0 >= 1, got {prompt_tokens.shape}.")
  if max_new < 0:
    raise ModelError(f"max_new must be >= 0, got {max_new}.")
  if temperature < 0:
    raise ModelError(f"temperature must be >= 0, got {temperature}.")
  if temperature > 0 and rng is None:
    raise ModelError("sampling with temperature > 0 needs an rng key (jax.random.key(seed)).")
  b, s0 = prompt_tokens.shape
  total = s0 + max_new
  if total > model.cfg.max_seq_len:
    raise ModelError(f"prompt ({s0}) + max_new ({max_new}) = {total} exceeds "
                     f"cfg.max_seq_len={model.cfg.max_seq_len}.")
  buf = jnp.zeros((b, total), jnp.int32).at[:, :s0].set(prompt_tokens.astype(jnp.int32))
  rng = jax.random.key(0) if rng is None else rng
  step = _generate_step(moe_fn, float(temperature))
  for t in range(s0, total):
    rng, key = jax.random.split(rng)
    buf = step(model, buf, jnp.int32(t), key)
  return buf


@functools.lru_cache(maxsize=32)
def _generate_step(moe_fn: MoeFn | None, temperature: float):
  """One jitted decoding step ``(model, buf [B, T], t, key) -> buf`` (cached per hook/temp)."""

  @nnx.jit
  def step(model, buf, t, key):
    logits, _ = model(buf, moe_fn=moe_fn)
    last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)  # [B, V]
    if temperature > 0:
      nxt = jax.random.categorical(key, last / temperature, axis=-1)
    else:
      nxt = jnp.argmax(last, axis=-1)
    return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32)[:, None], t, axis=1)

  return step
