"""Model parameters as plain nested dicts: extraction, shape checks, and building a model from them
(shared by the orbax checkpoints of :mod:`moe_edge.model.checkpoint` and the safetensors import of
:mod:`moe_edge.model.safetensors_io`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_edge.config import ModelConfig
from moe_edge.core.errors import MoeEdgeError
from moe_edge.model.transformer import MoETransformer


class CheckpointError(MoeEdgeError):
  """A checkpoint is missing, incomplete, or does not match the model it is loaded into."""


def path_str(path) -> str:
  """A jax key path as ``"layers/0/attn/wq"``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype name)}`` of every leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
  """``(graphdef, state)`` of an :class:`MoETransformer` for ``cfg`` with abstract arrays."""
  abstract = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0), dtype=dtype))
  return nnx.split(abstract)


def params_dict(model: MoETransformer) -> dict:
  """The model's parameters as a plain nested dict of arrays (layer indices are int keys)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: ModelConfig, params: dict, dtype=jnp.float32) -> MoETransformer:
  """Build a model for ``cfg`` holding ``params`` (a dict shaped like :func:`params_dict`).

  Raises CheckpointError naming any missing, extra or misshaped parameter.
  """
  graphdef, state = abstract_model(cfg, dtype)
  want = shapes(nnx.to_pure_dict(state))
  got = shapes(params)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = [f"{k}: expected {want[k][0]}, got {got[k][0]}" for k in sorted(set(want) & set(got))
         if want[k][0] != got[k][0]]
  if missing or extra or bad:
    raise CheckpointError(
        f"parameters do not fit model config {cfg.name!r}: missing {missing or 'none'}; "
        f"unexpected {extra or 'none'}; wrong shapes {bad or 'none'}.")
  ref = nnx.to_pure_dict(state)
  params = jax.tree.map(lambda a, r: jnp.asarray(np.asarray(a).astype(r.dtype)), params, ref)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
