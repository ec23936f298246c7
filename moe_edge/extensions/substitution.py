"""Importance-driven expert substitution and local-preferring routing (off by default).

A token on server ``n`` whose expert ``e`` is not hosted on ``n`` must travel (dispatch, compute
elsewhere, combine). Two ways to keep it home, both pure, jittable functions of one layer's
routing (after Zhu et al., "Enabling MoE on the Edge via Importance-Driven Expert Scheduling",
arXiv:2508.18983, where the "local" set is the experts cached in GPU memory):

* :func:`substitute` -- *importance-driven substitution*: a choice ``(t, r)`` that is remote and
  unimportant (gate ``< threshold``) is replaced by the locally hosted expert of the same layer
  most similar to ``e`` (``sim [E, E]`` from ``similarity.py``) that the token has not already
  chosen. Important or local choices are never touched. By default the substitute *inherits the
  gate* of the choice it replaces (gates are not renormalised: the token still has ``k`` choices
  with the same weights, so with ``norm_topk_prob`` they still sum to one). With
  ``scale_gates=True`` the inherited gate is multiplied by ``clip(sim[e, e'], 0, 1)``: for output
  cosines this is a crude least-squares shrinkage (a substitute whose output is orthogonal to the
  original's contributes nothing, i.e. the choice is dropped). ``threshold = 0`` changes nothing;
  ``threshold > max gate`` substitutes every remote choice that has a local candidate.
* :func:`prefer_local` -- *local-preferring top-k*: re-run the top-k selection on the router
  probabilities; at each rank, if the best remaining expert is remote and a remaining local
  expert's probability is within a relative ``tolerance`` of it (``p_local > (1 - tol) *
  p_best``), take the local one. Gates are the router probabilities of the picked experts,
  renormalised like the model's router (``norm_topk_prob``). ``tolerance = 0`` is exactly the
  model's own top-k (same experts, same order, bitwise the same gates).
* :func:`drop_remote` -- the control both are judged against: remote choices with gate
  ``< threshold`` are simply skipped (gate 0, expert parked on an unused local expert so nothing
  travels), the remaining gates optionally renormalised to the original mass.

:func:`substitution_moe_fn` and :func:`local_preference_moe_fn` wrap them as a ``moe_fn`` for
the model (``transform.py``), composable with any other ``moe_fn`` such as the distributed
dispatch: the transform runs first, the given ``moe_fn`` then computes the new routing.

Shapes: ``T`` tokens, ``k`` top-k, ``E`` experts, ``N`` servers, ``L`` MoE layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_edge.extensions.transform import (MoeFn, RoutingTransform, TransformError,
                                           TransformedMoE, token_servers, with_shape)


def _check_tables(hosts, sim) -> None:
  if hosts.ndim != 2 or sim.ndim != 2 or sim.shape != (hosts.shape[1], hosts.shape[1]):
    raise TransformError(f"hosts must be [N, E] and sim [E, E] for one layer; got "
                         f"{tuple(hosts.shape)} and {tuple(sim.shape)}.")


def substitute(expert_ids: jax.Array, gates: jax.Array, server: jax.Array, hosts: jax.Array,
               sim: jax.Array, threshold, min_similarity: float = -jnp.inf,
               scale_gates: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replace remote low-gate choices by the most similar local expert (module docstring).

  Args:
    expert_ids: ``[T, k] int`` the router's choices (distinct per token).
    gates: ``[T, k]`` their gate weights.
    server: ``[T] int`` the server each token is on.
    hosts: ``[N, E] bool`` this layer's placement (``Placement.hosts[:, l]``).
    sim: ``[E, E]`` similarity, row ``e`` = how well each expert stands in for ``e``.
    threshold: a choice is a candidate iff remote and ``gate < threshold``.
    min_similarity: substitutes less similar than this are not used (the choice stays remote).
    scale_gates: multiply a substitute's gate by ``clip(sim, 0, 1)`` (default: inherit it).

  Returns:
    ``(new_ids [T, k] int32, gates [T, k], substituted [T, k] bool)``; gates are unchanged
    unless ``scale_gates``. No token
    ever holds the same expert twice: a substitute is local, so it differs from the remote
    expert it replaces, and it is never one of the token's other choices or substitutes.
  """
  _check_tables(hosts, sim)
  ids = expert_ids.astype(jnp.int32)
  n_exp = hosts.shape[1]
  local = hosts.astype(bool)[server]                                   # [T, E]
  is_local = jnp.take_along_axis(local, ids, axis=1)                   # [T, k]
  eligible = ~is_local & (gates < threshold)
  taken = jnp.any(jax.nn.one_hot(ids, n_exp, dtype=bool), axis=1)     # [T, E]
  sim = sim.astype(jnp.float32)
  cols, done, scale = [], [], []
  for r in range(ids.shape[1]):
    score = jnp.where(local & ~taken, sim[ids[:, r]], -jnp.inf)        # [T, E]
    best = jnp.argmax(score, axis=1).astype(jnp.int32)
    best_score = jnp.max(score, axis=1)
    do = eligible[:, r] & (best_score > -jnp.inf) & (best_score >= min_similarity)
    cols.append(jnp.where(do, best, ids[:, r]))
    done.append(do)
    scale.append(jnp.where(do, jnp.clip(best_score, 0.0, 1.0), 1.0))
    taken = taken | (do[:, None] & jax.nn.one_hot(best, n_exp, dtype=bool))
  if scale_gates:
    gates = gates * jnp.stack(scale, axis=1).astype(gates.dtype)
  return jnp.stack(cols, axis=1), gates, jnp.stack(done, axis=1)


def prefer_local(probs: jax.Array, server: jax.Array, hosts: jax.Array, top_k: int,
                 tolerance, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k selection that prefers locally hosted experts of near-equal probability.

  Args:
    probs: ``[T, E]`` router probabilities (softmax over all experts).
    server: ``[T] int``; hosts: ``[N, E] bool`` of this layer.
    top_k: ``k``.
    tolerance: relative slack in ``[0, 1]``; at each rank a remaining local expert with
      ``p > (1 - tolerance) * p_best`` replaces a remote best. ``0``: plain top-k.
    norm_topk_prob: renormalise the picked probabilities to sum to one (as the router does).

  Returns:
    ``expert_ids [T, k] int32`` (rank order) and ``gates [T, k] float32``.
  """
  probs = probs.astype(jnp.float32)
  n_exp = probs.shape[1]
  local = hosts.astype(bool)[server]
  chosen = jnp.zeros(probs.shape, bool)
  ids, picked = [], []
  for _ in range(top_k):
    avail = jnp.where(chosen, -jnp.inf, probs)
    best = jnp.argmax(avail, axis=1)
    best_p = jnp.max(avail, axis=1)
    lavail = jnp.where(local & ~chosen, probs, -jnp.inf)
    lbest = jnp.argmax(lavail, axis=1)
    lbest_p = jnp.max(lavail, axis=1)
    best_local = jnp.take_along_axis(local, best[:, None], axis=1)[:, 0]
    swap = ~best_local & (lbest_p > (1.0 - tolerance) * best_p)
    pick = jnp.where(swap, lbest, best).astype(jnp.int32)
    ids.append(pick)
    picked.append(jnp.take_along_axis(probs, pick[:, None], axis=1)[:, 0])
    chosen = chosen | jax.nn.one_hot(pick, n_exp, dtype=bool)
  gates = jnp.stack(picked, axis=1)
  if norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return jnp.stack(ids, axis=1), gates


def drop_remote(expert_ids: jax.Array, gates: jax.Array, server: jax.Array, hosts: jax.Array,
                threshold, renormalize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Skip remote choices with gate ``< threshold`` (the no-substitute control).

  Args: as :func:`substitute`; ``renormalize`` rescales the kept gates of a token to its
  original gate mass.

  Returns:
    ``(ids [T, k] int32, gates [T, k], dropped [T, k] bool)``: a dropped choice has gate 0 and
    is re-pointed to the lowest-id local expert the token does not use (if any), so a real
    dispatch sends nothing for it; ids stay distinct.
  """
  ids = expert_ids.astype(jnp.int32)
  n_exp = hosts.shape[1]
  local = hosts.astype(bool)[server]
  drop = ~jnp.take_along_axis(local, ids, axis=1) & (gates < threshold)
  g = jnp.where(drop, 0.0, gates.astype(jnp.float32))
  if renormalize:
    kept = jnp.sum(g, axis=-1, keepdims=True)
    total = jnp.sum(gates.astype(jnp.float32), axis=-1, keepdims=True)
    g = jnp.where(kept > 0, g * (total / jnp.where(kept > 0, kept, 1.0)), 0.0)
  taken = jnp.any(jax.nn.one_hot(ids, n_exp, dtype=bool), axis=1)
  cols = []
  for r in range(ids.shape[1]):
    spare = local & ~taken
    slot = jnp.argmax(spare, axis=1).astype(jnp.int32)
    park = drop[:, r] & jnp.any(spare, axis=1)
    cols.append(jnp.where(park, slot, ids[:, r]))
    taken = taken | (park[:, None] & jax.nn.one_hot(slot, n_exp, dtype=bool))
  return jnp.stack(cols, axis=1), g, drop


# --------------------------------------------------------------------------------------------
# As routing transforms / moe_fn wrappers
# --------------------------------------------------------------------------------------------
def substitution_transform(hosts, sim, server, threshold, min_similarity: float = -jnp.inf,
                           scale_gates: bool = False) -> RoutingTransform:
  """Routing transform applying :func:`substitute` at every MoE layer.

  Args:
    hosts: ``[N, L, E] bool`` the placement; sim: ``[L, E, E]``.
    server: server of each batch row ``[B]`` or token ``[B, S]`` (batch-row layout of the
      distributed dispatch: row ``b`` is on server ``b // (B / N)``).
    threshold, min_similarity, scale_gates: see :func:`substitute` (the first two may be
      traced values).
  """
  hosts, sim = jnp.asarray(hosts, bool), jnp.asarray(sim, jnp.float32)
  if sim.ndim != 3 or hosts.ndim != 3 or sim.shape != (hosts.shape[1],) + hosts.shape[2:] * 2:
    raise TransformError(f"hosts must be [N, L, E] and sim [L, E, E]; got {tuple(hosts.shape)} "
                         f"and {tuple(sim.shape)}.")

  def transform(layer, x, expert_ids, gates):
    b, s, k = expert_ids.shape
    srv = token_servers(server, (b, s))
    ids, g, ch = substitute(expert_ids.reshape(b * s, k), gates.reshape(b * s, k), srv,
                            hosts[:, layer], sim[layer], threshold, min_similarity,
                            scale_gates)
    return ids.reshape(b, s, k), g.reshape(b, s, k), ch.reshape(b, s, k)

  return with_shape(transform, *hosts.shape[1:])


def substitution_moe_fn(hosts, sim, server, threshold, moe_fn: MoeFn | None = None,
                        record: bool = False, min_similarity: float = -jnp.inf,
                        scale_gates: bool = False) -> TransformedMoE:
  """``moe_fn`` that substitutes (:func:`substitution_transform`) and then runs ``moe_fn``."""
  return TransformedMoE(substitution_transform(hosts, sim, server, threshold, min_similarity,
                                               scale_gates), moe_fn, record)


def drop_remote_transform(hosts, server, threshold, renormalize: bool = True
                          ) -> RoutingTransform:
  """Routing transform applying :func:`drop_remote` at every MoE layer (``hosts [N, L, E]``)."""
  hosts = jnp.asarray(hosts, bool)
  if hosts.ndim != 3:
    raise TransformError(f"hosts must be [N, L, E], got {tuple(hosts.shape)}.")

  def transform(layer, x, expert_ids, gates):
    del x
    b, s, k = expert_ids.shape
    ids, g, ch = drop_remote(expert_ids.reshape(b * s, k), gates.reshape(b * s, k),
                             token_servers(server, (b, s)), hosts[:, layer], threshold,
                             renormalize)
    return ids.reshape(b, s, k), g.reshape(b, s, k), ch.reshape(b, s, k)

  return with_shape(transform, *hosts.shape[1:])


def local_preference_transform(router_weights, hosts, server, top_k: int, tolerance,
                               norm_topk_prob: bool) -> RoutingTransform:
  """Routing transform that re-selects each layer's top-k with :func:`prefer_local`.

  The router probabilities are recomputed from the MoE input ``x`` exactly as the model's
  router does (``softmax(x @ w_router)`` in float32), so with a float32 compute dtype and
  ``tolerance = 0`` the routing is bitwise the model's own.

  Args:
    router_weights: ``[L, d, E]`` the MoE blocks' ``w_router`` (see :func:`router_weights`).
    hosts: ``[N, L, E] bool``; server: ``[B]`` or ``[B, S]``.
  """
  w_router = jnp.asarray(router_weights, jnp.float32)
  hosts = jnp.asarray(hosts, bool)
  if w_router.ndim != 3 or hosts.ndim != 3 or w_router.shape[::2] != hosts.shape[1:]:
    raise TransformError(f"router_weights must be [L, d, E] and hosts [N, L, E] with the same L "
                         f"and E; got {tuple(w_router.shape)} and {tuple(hosts.shape)}.")

  def transform(layer, x, expert_ids, gates):
    del gates
    b, s, k = expert_ids.shape
    if k != top_k:
      raise TransformError(f"the model routes top-{k} but the transform was built for "
                           f"top_k={top_k}.")
    logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), w_router[layer])
    probs = jax.nn.softmax(logits, axis=-1).reshape(b * s, -1)
    ids, g = prefer_local(probs, token_servers(server, (b, s)), hosts[:, layer], top_k,
                          tolerance, norm_topk_prob)
    ids, g = ids.reshape(b, s, k), g.reshape(b, s, k)
    return ids, g, ids != expert_ids

  return with_shape(transform, *hosts.shape[1:])


def local_preference_moe_fn(router_weights, hosts, server, top_k: int, tolerance,
                            norm_topk_prob: bool, moe_fn: MoeFn | None = None,
                            record: bool = False) -> TransformedMoE:
  """``moe_fn`` applying :func:`local_preference_transform`, then ``moe_fn``."""
  return TransformedMoE(local_preference_transform(router_weights, hosts, server, top_k,
                                                   tolerance, norm_topk_prob), moe_fn, record)


def router_weights(model) -> jax.Array:
  """``[L, d, E]`` the router weights of ``model``'s MoE blocks, stacked."""
  return jnp.stack([b.w_router[...] for b in model.moe_blocks()])
