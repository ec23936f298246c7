"""Expert FFN math as pure functions on explicit weight arrays.

Every expert is a SwiGLU FFN ``down(silu(x @ gate) * (x @ up))``. The functions take the weights
as arguments (no module state) so the single-device reference here and the distributed dispatch
in ``moe_edge/parallel`` compute exactly the same thing. The routed experts run either densely
(:func:`moe_dense_reference`, every token through every expert) or grouped
(:func:`moe_grouped`: the token-choices sorted by expert through
:func:`moe_edge.kernels.grouped_ffn`); :func:`routed_experts`, the model's default, picks.

Shapes: ``T`` tokens, ``d`` hidden size, ``f`` expert FFN size, ``E`` experts, ``k`` top-k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_edge import kernels


def expert_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """One SwiGLU FFN. ``x [T, d]``, ``w_gate/w_up [d, f]``, ``w_down [f, d]`` -> ``[T, d]``."""
  h = jax.nn.silu(jnp.einsum("td,df->tf", x, w_gate)) * jnp.einsum("td,df->tf", x, w_up)
  return jnp.einsum("tf,fd->td", h, w_down)


def combine_weights(expert_ids: jax.Array, gates: jax.Array, n_experts: int) -> jax.Array:
  """Dense ``[T, E]`` weight of each expert for each token (0 for unchosen experts).

  ``expert_ids [T, k] int``, ``gates [T, k]``. An expert picked twice by one token (possible
  with a replayed trace) counts twice, the same as summing over the k choices.
  """
  onehot = jax.nn.one_hot(expert_ids, n_experts, dtype=gates.dtype)  # [T, k, E]
  return jnp.einsum("tk,tke->te", gates, onehot)


def moe_dense_reference(x: jax.Array, expert_ids: jax.Array, gates: jax.Array,
                        w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Routed-expert output of every token: ``sum_r gates[t, r] * FFN_{ids[t, r]}(x[t])``.

  The single-device reference: every token goes through every expert (einsum over ``E``) and
  the outputs are mixed by the dense combine weights, so it is exact, jit-friendly and drops no
  token, at ``E / k`` times the FLOPs of a sparse dispatch.

  Args:
    x: ``[T, d]`` tokens.
    expert_ids: ``[T, k] int32`` chosen experts.
    gates: ``[T, k]`` gate weight of each choice.
    w_gate, w_up: ``[E, d, f]``.
    w_down: ``[E, f, d]``.

  Returns:
    ``[T, d]`` in the dtype of ``x``.
  """
  n_experts = w_gate.shape[0]
  combine = combine_weights(expert_ids, gates.astype(x.dtype), n_experts)  # [T, E]
  h = (jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) *
       jnp.einsum("td,edf->tef", x, w_up))  # [T, E, f]
  h = h * combine[:, :, None]
  return jnp.einsum("tef,efd->td", h, w_down)


def moe_grouped(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, backend: str | None = None) -> jax.Array:
  """The routed-expert output of :func:`moe_dense_reference`, computing only the chosen experts.

  The ``T * k`` token-choices are sorted by expert and run through
  :func:`moe_edge.kernels.grouped_ffn` (one group per expert, ``backend`` as there), then mixed
  by their gates. Expert ids outside ``[0, E)`` contribute zero, as in the dense reference.
  Shapes as :func:`moe_dense_reference`; returns ``[T, d]`` in the dtype of ``x``.
  """
  t, k = expert_ids.shape
  order, sizes = kernels.sort_by_group(expert_ids.reshape(t * k).astype(jnp.int32),
                                       w_gate.shape[0])
  rows = x[order // k]  # choice c belongs to token c // k
  y = kernels.grouped_ffn(rows, sizes, (w_gate, w_up), w_down, backend=backend)
  y_choice = jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", gates.astype(x.dtype), y_choice)


def routed_experts(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The model's default routed-expert compute, chosen where traced.

  :func:`moe_grouped` when the grouped FFN runs on the Mosaic GPU kernel (Hopper, bf16/fp16,
  tokamax installed; see :func:`moe_edge.kernels.select_backend`, overridable with
  :func:`moe_edge.kernels.ffn_backend`): its cost follows the experts used. Otherwise
  :func:`moe_dense_reference`: on CPU that keeps every recorded result bit-identical, and
  XLA's ``ragged_dot`` elsewhere computes densely over the experts anyway. Shapes as
  :func:`moe_dense_reference`.
  """
  if kernels.select_backend(x.dtype) == "mosaic":
    return moe_grouped(x, expert_ids, gates, w_gate, w_up, w_down, backend="mosaic")
  return moe_dense_reference(x, expert_ids, gates, w_gate, w_up, w_down)


def shared_expert_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                      w_shared_gate: jax.Array | None = None) -> jax.Array:
  """Always-on shared experts, concatenated into one FFN of width ``n_shared * d_ff_shared``.

  ``x [T, d]``, ``w_gate/w_up [d, F]``, ``w_down [F, d]``; with ``w_shared_gate [d, 1]`` the
  output is multiplied by ``sigmoid(x @ w_shared_gate)`` (Qwen-MoE). Returns ``[T, d]``.
  """
  y = expert_ffn(x, w_gate, w_up, w_down)
  if w_shared_gate is not None:
    y = y * jax.nn.sigmoid(jnp.einsum("td,do->to", x, w_shared_gate))
  return y
