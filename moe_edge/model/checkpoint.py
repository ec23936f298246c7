"""Checkpoints: orbax save/restore of an :class:`MoETransformer` (+ optax state); the Hugging Face
safetensors import/export lives in :mod:`moe_edge.model.safetensors_io` (re-exported here).

On-disk layout of one checkpoint directory::

  <dir>/checkpoint.json   step, config (all ModelConfig fields), saved param dtype, format, extra
                          (the caller's JSON, e.g. the training history up to this step)
  <dir>/params/           orbax tree: the model's parameters as a nested dict
  <dir>/opt_state/        orbax tree {"leaves": [...]}: the optax state's leaves (optional)
  <dir>/checksums.json    size and sha256 of every other file (:mod:`moe_edge.io.checksums`)

A checkpoint is written into a hidden temporary sibling (``.<name>.partial-<tag>``) and renamed
into place when complete, so ``<dir>`` is complete or absent; :func:`partial_checkpoints` lists
what interrupted saves left. :func:`restore_checkpoint` verifies every checksum first (a corrupt,
truncated or missing file is one :class:`CheckpointError` naming it) and checks the stored model
config against the one asked for. Parameters may be saved in bfloat16 (``dtype``) to keep a
shipped checkpoint small; :func:`restore_checkpoint` casts them back to float32.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from moe_edge.config import ModelConfig, model_config
from moe_edge.io import atomic, checksums
from moe_edge.model.params import (CheckpointError, abstract_model, model_from_params,
                                   params_dict, shapes)
from moe_edge.model.safetensors_io import (HF_SCHEMES, HFTensor, export_hf_safetensors,
                                           hf_tensor_map, import_hf_safetensors)
from moe_edge.model.transformer import MoETransformer

__all__ = ["CheckpointError", "FORMAT_VERSION", "HF_SCHEMES", "HFTensor", "META_FILE",
           "checkpoint_config", "export_hf_safetensors", "hf_tensor_map",
           "import_hf_safetensors", "latest_checkpoint", "list_checkpoints", "model_from_params",
           "params_dict", "partial_checkpoints", "prune_checkpoints", "read_checkpoint_meta",
           "restore_checkpoint", "save_checkpoint", "step_dir", "verify_checkpoint"]

FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Names a checkpoint directory holds (orbax writes params/ and opt_state/ via its own temporary
# names starting the same way): an existing target holding only these is replaced.
_CHECKPOINT_ENTRY = re.compile(r"^(params|opt_state|checkpoint\.json|checksums\.json)")
# ModelConfig fields that label a config without changing the model it builds.
_CONFIG_LABELS = ("name", "source")


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _is_checkpoint_debris(directory: Path) -> bool:
  """True if every entry of ``directory`` is something a (possibly interrupted) save writes."""
  return all(_CHECKPOINT_ENTRY.match(p.name) for p in directory.iterdir())


def save_checkpoint(directory: str | Path, model: MoETransformer, opt_state=None, step: int = 0,
                    dtype=None, extra: dict | None = None) -> Path:
  """Save ``model``'s parameters (and optionally the optax ``opt_state``) with ``step``, atomically.

  Args:
    directory: target folder. An existing checkpoint there (complete or the remains of an
      interrupted save) is replaced once the new one is complete; a folder holding anything
      else is refused.
    model: the model.
    opt_state: optax state built as ``tx.init(nnx.state(model, nnx.Param))`` (or None). It is
      always saved at full precision.
    step: training step stored with the checkpoint.
    dtype: save the parameters in this dtype (e.g. ``jnp.bfloat16``); None keeps their dtype.
    extra: JSON-serialisable data stored in ``checkpoint.json`` under ``"extra"``.

  Returns:
    the absolute checkpoint path.
  """
  directory = Path(directory).resolve()
  if directory.exists() and (not directory.is_dir() or not _is_checkpoint_debris(directory)):
    raise CheckpointError(f"{directory} exists and is not a moe-edge checkpoint; refusing to "
                          f"overwrite it. Choose an empty or new directory.")
  params = params_dict(model)
  if dtype is not None:  # cast on the host: no device compile per shape
    params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)
  meta = {"format": FORMAT_VERSION, "step": int(step),
          "param_dtype": str(jax.tree.leaves(params)[0].dtype),
          "has_opt_state": opt_state is not None,
          "config": dataclasses.asdict(model.cfg), "extra": extra or {}}
  meta_text = json.dumps(meta, indent=1)  # fails before anything is written if not JSON
  with atomic.atomic_directory(directory, replace=True) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", params)
    if opt_state is not None:
      ckptr.save(tmp / "opt_state", {"leaves": list(jax.tree.leaves(opt_state))})
    ckptr.wait_until_finished()
    (tmp / META_FILE).write_text(meta_text)
    checksums.write(tmp)
  return directory


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------
def read_checkpoint_meta(directory: str | Path) -> dict:
  """The ``checkpoint.json`` of a checkpoint (step, config, param dtype, has_opt_state, extra).

  Only reads the file; :func:`verify_checkpoint` checks the content of the whole checkpoint.
  """
  path = Path(directory) / META_FILE
  if not path.is_file():
    raise CheckpointError(f"{directory} is not a complete checkpoint: {META_FILE} is missing "
                          f"(the save was interrupted, or the path is wrong).")
  try:
    meta = json.loads(path.read_text())
    for key in ("step", "param_dtype", "has_opt_state", "config"):
      meta[key]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}).") from None
  meta.setdefault("extra", {})
  return meta


def checkpoint_config(directory: str | Path) -> ModelConfig:
  """The :class:`ModelConfig` stored in a checkpoint."""
  stored = read_checkpoint_meta(directory)["config"]
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(stored) - known) if isinstance(stored, dict) else ["<not a mapping>"]
  if unknown:
    raise CheckpointError(f"{Path(directory) / META_FILE}: the stored model config has fields "
                          f"{unknown} that ModelConfig does not know; it was written by another "
                          f"version of moe-edge.")
  return ModelConfig(**stored)


def verify_checkpoint(directory: str | Path) -> None:
  """Raise CheckpointError naming the first missing, truncated or corrupt file of a checkpoint."""
  directory = Path(directory).resolve()
  read_checkpoint_meta(directory)
  checksums.verify(directory, error=CheckpointError, what=f"checkpoint {directory}")


def _check_config(directory: Path, stored: ModelConfig, asked: ModelConfig) -> None:
  a, b = dataclasses.asdict(stored), dataclasses.asdict(asked)
  diff = [f"{k} {a[k]!r} (checkpoint) vs {b[k]!r} (asked)" for k in a
          if k not in _CONFIG_LABELS and a[k] != b[k]]
  if diff:
    raise CheckpointError(
        f"checkpoint {directory} holds model config {stored.name!r}, which differs from the "
        f"asked config {asked.name!r}: {'; '.join(diff)}. Restore with cfg=None to use the "
        f"checkpoint's own config, or ask for the config it was trained with.")


def _check_param_shapes(directory: Path, ckptr, want: dict, cfg: ModelConfig) -> None:
  saved = ckptr.metadata(directory / "params").item_metadata
  want_shapes = {k: v[0] for k, v in shapes(want).items()}
  saved_shapes = {k: v[0] for k, v in shapes(saved).items()}
  if want_shapes != saved_shapes:
    missing = sorted(set(want_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(want_shapes))
    bad = [f"{k}: model {want_shapes[k]}, checkpoint {saved_shapes[k]}"
           for k in sorted(set(want_shapes) & set(saved_shapes))
           if want_shapes[k] != saved_shapes[k]]
    raise CheckpointError(
        f"checkpoint {directory} does not fit model config {cfg.name!r}: missing "
        f"{missing or 'none'}; unexpected {extra or 'none'}; wrong shapes {bad or 'none'}.")


def restore_checkpoint(directory: str | Path, cfg: ModelConfig | str | None = None,
                       tx: optax.GradientTransformation | None = None, dtype=jnp.float32
                       ) -> tuple[MoETransformer, object, int]:
  """Load a checkpoint written by :func:`save_checkpoint`, after verifying its checksums.

  Args:
    directory: the checkpoint folder.
    cfg: model config (or preset name) to build; it must equal the stored config (its name and
      source aside). None uses the config stored in the checkpoint.
    tx: the optimizer; needed to rebuild the optax state's structure. Without it (or when the
      checkpoint has no optimizer state) the returned opt_state is None.
    dtype: the model's compute dtype. Parameters always come back as float32.

  Returns:
    ``(model, opt_state or None, step)``; opt_state has the structure of
    ``tx.init(nnx.state(model, nnx.Param))``.
  """
  directory = Path(directory).resolve()
  verify_checkpoint(directory)
  meta = read_checkpoint_meta(directory)
  stored = checkpoint_config(directory)
  cfg = stored if cfg is None else model_config(cfg)
  _check_config(directory, stored, cfg)
  graphdef, state = abstract_model(cfg, dtype)
  want = nnx.to_pure_dict(state)
  ckptr = ocp.StandardCheckpointer()
  _check_param_shapes(directory, ckptr, want, cfg)
  saved_dtype = jnp.dtype(meta["param_dtype"])
  # Explicit single-device shardings make a checkpoint written on any backend or device count
  # (e.g. trained on a GPU) restorable here.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, saved_dtype, sharding=local), want)
  params = ckptr.restore(directory / "params", target)
  params = jax.tree.map(lambda a, ref: jnp.asarray(np.asarray(a).astype(ref.dtype)), params, want)
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  opt_state = None
  if tx is not None and meta["has_opt_state"]:
    opt_state = _restore_opt_state(directory, ckptr, tx, model, local)
  return model, opt_state, int(meta["step"])


def _restore_opt_state(directory: Path, ckptr, tx, model, local):
  abstract_opt = jax.eval_shape(tx.init, nnx.state(model, nnx.Param))
  leaves, treedef = jax.tree.flatten(abstract_opt)
  saved_leaves = ckptr.metadata(directory / "opt_state").item_metadata["leaves"]
  got = [tuple(x.shape) for x in saved_leaves]
  exp = [tuple(x.shape) for x in leaves]
  if got != exp:
    raise CheckpointError(
        f"optimizer state in {directory} has {len(got)} arrays that do not match the given "
        f"optimizer ({len(exp)} arrays expected); restore with the same optax transformation "
        f"that was used for training, or pass tx=None to load the parameters only.")
  target = {"leaves": [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local) for x in leaves]}
  restored = ckptr.restore(directory / "opt_state", target)["leaves"]
  return jax.tree.unflatten(treedef, restored)


# --------------------------------------------------------------------------------------------
# Step checkpoints of a training run
# --------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
  """Complete ``<root>/step_<N>`` checkpoints, sorted by step."""
  root = Path(root)
  if not root.is_dir():
    return []
  out = []
  for p in root.iterdir():
    m = STEP_DIR.match(p.name)
    if m and p.is_dir() and (p / META_FILE).is_file():
      out.append((int(m.group(1)), p))
  return sorted(out)


def partial_checkpoints(root: str | Path) -> list[Path]:
  """What interrupted saves left under ``root``: temporary ``.*.partial-*`` siblings, and
  ``step_<N>`` directories without ``checkpoint.json`` (written by older moe-edge versions)."""
  root = Path(root)
  if not root.is_dir():
    return []
  stale = [p for p in root.iterdir()
           if STEP_DIR.match(p.name) and p.is_dir() and not (p / META_FILE).is_file()]
  return sorted(atomic.partial_siblings(root) + stale)


def latest_checkpoint(root: str | Path) -> Path | None:
  """The complete ``<root>/step_<N>`` checkpoint with the largest N, or None."""
  found = list_checkpoints(root)
  return found[-1][1] if found else None


def step_dir(root: str | Path, step: int) -> Path:
  """``<root>/step_<step, 8 digits>``."""
  return Path(root) / f"step_{step:08d}"


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
  """Delete all but the ``keep`` newest complete step checkpoints under ``root``; return them."""
  gone = [path for _, path in list_checkpoints(root)[:-keep]] if keep > 0 else []
  for path in gone:
    atomic.remove(path)
  return gone
