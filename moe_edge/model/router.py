"""Top-k routing as pure functions: router logits -> (expert ids, gate weights), load balance.

Softmax over all ``E`` experts first, then the ``k`` largest probabilities (OLMoE, Qwen-MoE and
DeepSeek style). With ``norm_topk_prob`` the chosen probabilities are renormalised to sum to one,
which equals Mixtral's softmax over the top-k logits: ``softmax(l)_i / sum_{j in top} softmax(l)_j
= exp(l_i) / sum_{j in top} exp(l_j)``.

Everything is jit-friendly. NaN logits cannot raise inside ``jit``; :func:`check_finite_gates`
is the eager check for debugging and for trace collection.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_edge.core.errors import MoeEdgeError


class RoutingError(MoeEdgeError):
  """Router inputs or outputs are malformed (wrong shape, NaN/inf gates, bad expert ids)."""


def router_probs(logits: jax.Array) -> jax.Array:
  """Softmax over experts in float32. ``logits [..., E]`` -> ``probs [..., E]``."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Pick the ``top_k`` experts of every token.

  Args:
    logits: ``[T, E]`` router logits (any leading dims ``[..., E]`` work the same way).
    top_k: experts per token ``k`` (``1 <= k <= E``).
    norm_topk_prob: renormalise the k chosen probabilities to sum to one.

  Returns:
    expert_ids ``[T, k] int32`` (best first) and gates ``[T, k] float32``.
  """
  n_experts = logits.shape[-1]
  if not 1 <= top_k <= n_experts:
    raise RoutingError(f"top_k={top_k} must be in [1, n_experts={n_experts}].")
  probs = router_probs(logits)
  gates, expert_ids = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return expert_ids.astype(jnp.int32), gates.astype(jnp.float32)


def check_finite_gates(gates, where: str = "router") -> None:
  """Eager check (outside ``jit``): raise RoutingError if any gate weight is NaN or infinite.

  Non-finite gates mean non-finite router logits, i.e. the activations or the router weights
  diverged; the message points at the first bad token.
  """
  g = np.asarray(gates)
  bad = ~np.isfinite(g)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise RoutingError(
        f"{where}: {int(bad.sum())} non-finite gate weights (first at index {first}, value "
        f"{g[first]}). The router logits are NaN/inf: check the input activations, the learning "
        f"rate, and that the weights were loaded correctly.")


def expert_fractions(expert_ids: jax.Array, n_experts: int) -> jax.Array:
  """``f_e``: fraction of all token-choices that went to expert e. ``[T, k]`` -> ``[E]``."""
  onehot = jax.nn.one_hot(expert_ids, n_experts, dtype=jnp.float32)  # [T, k, E]
  return jnp.mean(onehot, axis=tuple(range(onehot.ndim - 1)))


def load_balancing_loss(probs: jax.Array, expert_ids: jax.Array, n_experts: int) -> jax.Array:
  """Switch / Mixtral auxiliary loss ``E * sum_e f_e * P_e``.

  ``f_e`` is the fraction of token-choices routed to expert e (sums to one over e), ``P_e`` the
  mean router probability of e. It is 1.0 for perfectly uniform routing and grows up to ``E``
  as routing collapses onto one expert. (Hugging Face's Mixtral version counts all k choices,
  i.e. is ``k`` times this value.)

  Args:
    probs: ``[T, E]`` router probabilities (softmax over all experts).
    expert_ids: ``[T, k]`` chosen experts.
    n_experts: ``E``.

  Returns:
    scalar float32.
  """
  probs = probs.reshape(-1, probs.shape[-1]).astype(jnp.float32)
  f = expert_fractions(expert_ids.reshape(-1, expert_ids.shape[-1]), n_experts)
  p = jnp.mean(probs, axis=0)
  return n_experts * jnp.sum(f * p)
