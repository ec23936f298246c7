"""Routing transforms on the dispatch path, composable with any ``moe_fn``.

A *routing transform* rewrites the routing of one MoE layer before the experts run::

  transform(layer, x [B,S,d], expert_ids [B,S,k], gates [B,S,k])
      -> (expert_ids [B,S,k] int32, gates [B,S,k] f32, changed [B,S,k] bool)

``changed`` marks the choices the transform altered (a different expert, or a dropped choice).
A transform built for a placement may carry ``transform.shape = (L, E)`` (see
:func:`with_shape`); :class:`TransformedMoE` then checks it against the model's layer and experts.
:class:`TransformedMoE` turns a transform into a ``moe_fn`` for
``MoETransformer(tokens, moe_fn=...)``: it applies the transform, then calls the given ``moe_fn``
(the single-device dense reference by default, or e.g. the distributed dispatch of
``moe_edge.parallel.dispatch.distributed_moe_fn``) with the new routing. The transforms of this
package (``substitution.py``, ``budgeted.py``) are pure ``jnp`` code, so the whole model stays
jittable; nothing changes unless a transform is passed (off by default).

Recording: with ``record=True`` the wrapper keeps each layer's transformed routing (and the MoE
input ``x``) in :attr:`TransformedMoE.records`. The records are arrays of the trace the wrapper
was called in, so under ``jax.jit`` build the wrapper *inside* the jitted function and return the
records from it (:meth:`TransformedMoE.stacked`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from moe_edge.core.errors import MoeEdgeError
from moe_edge.model import experts as experts_lib

RoutingTransform = Callable[[int, jax.Array, jax.Array, jax.Array],
                            tuple[jax.Array, jax.Array, jax.Array]]
MoeFn = Callable[..., jax.Array]


class TransformError(MoeEdgeError):
  """A routing transform or its tables do not fit the model or the batch."""


def dense_moe_fn(layer: int, x: jax.Array, expert_ids: jax.Array, gates: jax.Array,
                 w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The dense reference expert compute (:func:`moe_dense_reference`) as a ``moe_fn``.

  It is the model's own default operation, bitwise, wherever
  :func:`~moe_edge.model.experts.routed_experts` picks the dense reference: on CPU and on GPUs
  without the Mosaic grouped kernel. On a Hopper GPU with tokamax the model's default is the
  grouped FFN instead (:func:`~moe_edge.model.experts.moe_grouped`), and the two agree within
  the dtype's rounding, not bitwise.

  ``x [B,S,d]``, ``expert_ids/gates [B,S,k]``, ``w_gate/w_up [E,d,f]``, ``w_down [E,f,d]`` ->
  ``[B,S,d]``.
  """
  del layer
  b, s, d = x.shape
  k = expert_ids.shape[-1]
  y = experts_lib.moe_dense_reference(x.reshape(b * s, d), expert_ids.reshape(b * s, k),
                                      gates.reshape(b * s, k), w_gate, w_up, w_down)
  return y.reshape(b, s, d)


def token_servers(server, batch_shape: tuple[int, int]) -> jax.Array:
  """Server of every token, ``[B*S] int32``, from ``server`` given per row ``[B]`` or per token
  ``[B,S]`` (a scalar means every token is on that server)."""
  b, s = batch_shape
  srv = jnp.asarray(server, jnp.int32)
  if srv.ndim == 0:
    srv = jnp.full((b, s), srv)
  elif srv.shape == (b,):
    srv = jnp.broadcast_to(srv[:, None], (b, s))
  elif srv.shape != (b, s):
    raise TransformError(f"server must be a scalar, [B] = [{b}] (server of each batch row) or "
                         f"[B, S] = [{b}, {s}] (server of each token); got shape {srv.shape}.")
  return srv.reshape(b * s)


def with_shape(transform: RoutingTransform, n_layers: int, n_experts: int) -> RoutingTransform:
  """Attach the ``(L, E)`` a transform's tables are for, so the wrapper can check the model."""
  transform.shape = (int(n_layers), int(n_experts))
  return transform


def check_shape(transform, layer: int, n_experts: int) -> None:
  """Raise TransformError unless ``transform.shape`` (if any) covers ``layer`` and ``n_experts``."""
  shape = getattr(transform, "shape", None)
  if shape is None:
    return
  if not 0 <= layer < shape[0] or shape[1] != n_experts:
    raise TransformError(f"the routing transform's tables are for [L, E] = {list(shape)} but the "
                         f"model calls MoE layer {layer} with {n_experts} experts; was the "
                         f"placement made for another model?")


@dataclasses.dataclass
class LayerRecord:
  """What :class:`TransformedMoE` saw and did at one MoE layer. Shapes ``[B,S,...]``."""
  x: jax.Array
  expert_ids_in: jax.Array
  gates_in: jax.Array
  expert_ids: jax.Array
  gates: jax.Array
  changed: jax.Array
  y: jax.Array


class TransformedMoE:
  """``moe_fn`` that applies routing transforms, then runs ``moe_fn`` on the new routing.

  Args:
    transforms: one transform or a sequence, applied in order (a choice is ``changed`` if any
      transform changed it).
    moe_fn: the expert compute to run afterwards; default :func:`dense_moe_fn` (what the model
      does without a ``moe_fn``). Any callable with the model's ``moe_fn`` signature works,
      including the distributed dispatch.
    record: keep a :class:`LayerRecord` per layer in ``records`` (module docstring).
  """

  def __init__(self, transforms: RoutingTransform | Sequence[RoutingTransform],
               moe_fn: MoeFn | None = None, record: bool = False):
    self.transforms = (tuple(transforms) if isinstance(transforms, (list, tuple))
                       else (transforms,))
    if not all(callable(t) for t in self.transforms):
      raise TransformError("every routing transform must be callable as "
                           "transform(layer, x, expert_ids, gates).")
    self.moe_fn = dense_moe_fn if moe_fn is None else moe_fn
    self.record = record
    self.records: dict[int, LayerRecord] = {}

  def __call__(self, layer, x, expert_ids, gates, w_gate, w_up, w_down):
    ids, g = expert_ids, gates
    changed = jnp.zeros(expert_ids.shape, bool)
    for t in self.transforms:
      check_shape(t, layer, w_gate.shape[0])
      ids, g, ch = t(layer, x, ids, g)
      if ids.shape != expert_ids.shape or g.shape != gates.shape or ch.shape != ids.shape:
        raise TransformError(f"transform {t!r} returned shapes {ids.shape}, {g.shape}, "
                             f"{ch.shape}; it must keep [B, S, k] = {expert_ids.shape}.")
      changed = changed | ch
    y = self.moe_fn(layer, x, ids, g, w_gate, w_up, w_down)
    if self.record:
      self.records[int(layer)] = LayerRecord(x, expert_ids, gates, ids, g, changed, y)
    return y

  def stacked(self) -> dict[str, jax.Array]:
    """Records stacked over layers: ``x [B,S,L,d]``, ``expert_ids, gates, changed,
    expert_ids_in, gates_in [B,S,L,k]``, ``y [B,S,L,d]``."""
    if not self.records:
      raise TransformError("nothing recorded: build TransformedMoE(..., record=True) and run "
                           "the model with it first.")
    layers = sorted(self.records)
    return {f.name: jnp.stack([getattr(self.records[l], f.name) for l in layers], axis=2)
            for f in dataclasses.fields(LayerRecord)}


def identity_transform(layer, x, expert_ids, gates):
  """The transform that changes nothing (for recording routing through :class:`TransformedMoE`)."""
  del layer, x
  return expert_ids, gates, jnp.zeros(expert_ids.shape, bool)
