"""Checkpoints: orbax save/restore of an :class:`MoETransformer` (+ optax state), and Hugging Face
safetensors import/export for Mixtral, OLMoE, Qwen-MoE and DeepSeek-style naming.

On-disk layout of one checkpoint directory::

  <dir>/checkpoint.json   step, config (all ModelConfig fields), saved param dtype, format
  <dir>/params/           orbax tree: the model's parameters as a nested dict
  <dir>/opt_state/        orbax tree {"leaves": [...]}: the optax state's leaves (optional)

``checkpoint.json`` is written last, so a directory without it is an interrupted save and is
ignored by :func:`latest_checkpoint`. Parameters may be saved in bfloat16 (``dtype``) to keep a
shipped checkpoint small; :func:`restore_checkpoint` casts them back to float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import safetensors.numpy
from safetensors import safe_open
from flax import nnx

from moe_edge.core.errors import MoeEdgeError
from moe_edge.config import ModelConfig, model_config
from moe_edge.model.transformer import MoETransformer

FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(MoeEdgeError):
  """A checkpoint is missing, incomplete, or does not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def _abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
  abstract = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0), dtype=dtype))
  return nnx.split(abstract)


def params_dict(model: MoETransformer) -> dict:
  """The model's parameters as a plain nested dict of arrays (layer indices are int keys)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: ModelConfig, params: dict, dtype=jnp.float32) -> MoETransformer:
  """Build a model for ``cfg`` holding ``params`` (a dict shaped like :func:`params_dict`).

  Raises CheckpointError naming any missing, extra or misshaped parameter.
  """
  graphdef, state = _abstract_model(cfg, dtype)
  want = _shapes(nnx.to_pure_dict(state))
  got = _shapes(params)
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


# --------------------------------------------------------------------------------------------
# Orbax save / restore
# --------------------------------------------------------------------------------------------
def save_checkpoint(directory: str | Path, model: MoETransformer, opt_state=None, step: int = 0,
                    dtype=None) -> Path:
  """Save ``model``'s parameters (and optionally the optax ``opt_state``) with ``step``.

  Args:
    directory: target folder. An existing checkpoint there is replaced; a non-empty folder that
      is not a checkpoint is refused.
    model: the model.
    opt_state: optax state built as ``tx.init(nnx.state(model, nnx.Param))`` (or None). It is
      always saved at full precision.
    step: training step stored with the checkpoint.
    dtype: save the parameters in this dtype (e.g. ``jnp.bfloat16``); None keeps their dtype.

  Returns:
    the absolute checkpoint path.
  """
  directory = Path(directory).resolve()
  if directory.exists():
    if (directory / META_FILE).is_file() or (directory / "params").is_dir():
      shutil.rmtree(directory)
    elif any(directory.iterdir()):
      raise CheckpointError(f"{directory} exists and is not a moe-edge checkpoint; refusing to "
                            f"overwrite it. Choose an empty or new directory.")
  directory.mkdir(parents=True, exist_ok=True)
  params = params_dict(model)
  if dtype is not None:  # cast on the host: no device compile per shape
    params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / "params", params)
  if opt_state is not None:
    ckptr.save(directory / "opt_state", {"leaves": list(jax.tree.leaves(opt_state))})
  ckptr.wait_until_finished()
  meta = {"format": FORMAT_VERSION, "step": int(step),
          "param_dtype": str(jax.tree.leaves(params)[0].dtype),
          "has_opt_state": opt_state is not None,
          "config": dataclasses.asdict(model.cfg)}
  (directory / META_FILE).write_text(json.dumps(meta, indent=1))
  return directory


def read_checkpoint_meta(directory: str | Path) -> dict:
  """The ``checkpoint.json`` of a checkpoint (step, config, param dtype, has_opt_state)."""
  path = Path(directory) / META_FILE
  if not path.is_file():
    raise CheckpointError(f"{directory} is not a complete checkpoint: {META_FILE} is missing "
                          f"(the save was interrupted, or the path is wrong).")
  return json.loads(path.read_text())


def checkpoint_config(directory: str | Path) -> ModelConfig:
  """The :class:`ModelConfig` stored in a checkpoint."""
  return ModelConfig(**read_checkpoint_meta(directory)["config"])


def restore_checkpoint(directory: str | Path, cfg: ModelConfig | str | None = None,
                       tx: optax.GradientTransformation | None = None, dtype=jnp.float32
                       ) -> tuple[MoETransformer, object, int]:
  """Load a checkpoint written by :func:`save_checkpoint`.

  Args:
    directory: the checkpoint folder.
    cfg: model config (or preset name) to build; None uses the config stored in the checkpoint.
    tx: the optimizer; needed to rebuild the optax state's structure. Without it (or when the
      checkpoint has no optimizer state) the returned opt_state is None.
    dtype: the model's compute dtype. Parameters always come back as float32.

  Returns:
    ``(model, opt_state or None, step)``; opt_state has the structure of
    ``tx.init(nnx.state(model, nnx.Param))``.
  """
  directory = Path(directory).resolve()
  meta = read_checkpoint_meta(directory)
  cfg = checkpoint_config(directory) if cfg is None else model_config(cfg)
  graphdef, state = _abstract_model(cfg, dtype)
  want = nnx.to_pure_dict(state)
  ckptr = ocp.StandardCheckpointer()
  saved = ckptr.metadata(directory / "params").item_metadata
  want_shapes = {k: v[0] for k, v in _shapes(want).items()}
  saved_shapes = {k: v[0] for k, v in _shapes(saved).items()}
  if want_shapes != saved_shapes:
    missing = sorted(set(want_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(want_shapes))
    bad = [f"{k}: model {want_shapes[k]}, checkpoint {saved_shapes[k]}"
           for k in sorted(set(want_shapes) & set(saved_shapes))
           if want_shapes[k] != saved_shapes[k]]
    raise CheckpointError(
        f"checkpoint {directory} (config {meta['config']['name']!r}) does not fit model config "
        f"{cfg.name!r}: missing {missing or 'none'}; unexpected {extra or 'none'}; wrong shapes "
        f"{bad or 'none'}. Restore with cfg=None to use the checkpoint's own config.")
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
    target = {"leaves": [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local)
                         for x in leaves]}
    restored = ckptr.restore(directory / "opt_state", target)["leaves"]
    opt_state = jax.tree.unflatten(treedef, restored)
  return model, opt_state, int(meta["step"])


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


def latest_checkpoint(root: str | Path) -> Path | None:
  """The complete ``<root>/step_<N>`` checkpoint with the largest N, or None."""
  found = list_checkpoints(root)
  return found[-1][1] if found else None


def step_dir(root: str | Path, step: int) -> Path:
  """``<root>/step_<step, 8 digits>``."""
  return Path(root) / f"step_{step:08d}"


def prune_checkpoints(root: str | Path, keep: int) -> None:
  """Delete all but the ``keep`` newest complete step checkpoints under ``root``."""
  for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# Hugging Face safetensors
# --------------------------------------------------------------------------------------------
HF_SCHEMES = ("mixtral", "olmoe", "qwen_moe", "deepseek")
# Per scheme: module holding the MoE ("block_sparse_moe" or "mlp"), names of the three expert
# projections (gate, up, down), and the shared-expert module (None: the scheme has none).
_SCHEME = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "qwen_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "deepseek": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}
# Tensors real checkpoints carry that this model derives itself; skipped without complaint.
_DERIVED = re.compile(r"rotary_emb\.inv_freq$")
# Known tensors of real checkpoints that this model has no place for, with the reason.
_UNSUPPORTED = [
    (re.compile(r"self_attn\.(q_norm|k_norm)\.weight$"),
     "QK-norm (OLMoE) is not implemented by MoETransformer"),
    (re.compile(r"self_attn\.(q|k|v|o)_proj\.bias$"),
     "attention biases (Qwen) are not implemented by MoETransformer"),
    (re.compile(r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|q_a_layernorm|"
                r"kv_a_layernorm)\."),
     "DeepSeek multi-head latent attention is modelled as plain multi-head attention"),
]


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One Hugging Face tensor and where it lives in :func:`params_dict`.

  ``path``: key path in the params dict; ``expert``: index into the leading ``E`` axis of a
  stacked expert array (None: the whole array); ``n_in``: None for tensors copied as they are
  (norm scales, embeddings), else the number of leading *input* dims of our array (HF Linear
  weights are ``[out, in]``: ours is ``hf.T`` reshaped, e.g. ``q_proj [H*D, d] -> wq [d, H, D]``).
  """
  name: str
  path: tuple
  expert: int | None
  n_in: int | None


def hf_tensor_map(cfg: ModelConfig, scheme: str) -> list[HFTensor]:
  """Every tensor a Hugging Face checkpoint of ``scheme`` must hold for ``cfg``, in order."""
  if scheme not in _SCHEME:
    raise CheckpointError(f"unknown safetensors scheme {scheme!r}; use one of {HF_SCHEMES}.")
  moe_mod, (gname, uname, dname), shared_mod = _SCHEME[scheme]
  if cfg.n_shared_experts and shared_mod is None:
    raise CheckpointError(f"config {cfg.name!r} has {cfg.n_shared_experts} shared experts but "
                          f"scheme {scheme!r} names none; use 'qwen_moe' or 'deepseek'.")
  if cfg.shared_expert_gate and scheme != "qwen_moe":
    raise CheckpointError(f"config {cfg.name!r} has a shared-expert gate, which only the "
                          f"'qwen_moe' scheme names.")
  out = [HFTensor("model.embed_tokens.weight", ("embed",), None, None),
         HFTensor("model.norm.weight", ("final_norm", "scale"), None, None)]
  if not cfg.tie_embeddings:
    out.append(HFTensor("lm_head.weight", ("lm_head",), None, 1))
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    lay = ("layers", i)
    out += [HFTensor(pre + "input_layernorm.weight", lay + ("attn_norm", "scale"), None, None),
            HFTensor(pre + "post_attention_layernorm.weight", lay + ("ffn_norm", "scale"),
                     None, None),
            HFTensor(pre + "self_attn.q_proj.weight", lay + ("attn", "wq"), None, 1),
            HFTensor(pre + "self_attn.k_proj.weight", lay + ("attn", "wk"), None, 1),
            HFTensor(pre + "self_attn.v_proj.weight", lay + ("attn", "wv"), None, 1),
            HFTensor(pre + "self_attn.o_proj.weight", lay + ("attn", "wo"), None, 2)]
    ffn = lay + ("ffn",)
    if i < cfg.first_dense_layers:
      out += [HFTensor(pre + f"mlp.{n}.weight", ffn + (ours,), None, 1)
              for n, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"),
                              ("down_proj", "w_down"))]
      continue
    moe = pre + moe_mod + "."
    out.append(HFTensor(moe + "gate.weight", ffn + ("w_router",), None, 1))
    for j in range(cfg.n_experts):
      out += [HFTensor(moe + f"experts.{j}.{n}.weight", ffn + (ours,), j, 1)
              for n, ours in ((gname, "w_gate"), (uname, "w_up"), (dname, "w_down"))]
    if cfg.n_shared_experts:
      out += [HFTensor(moe + f"{shared_mod}.{n}.weight", ffn + (ours,), None, 1)
              for n, ours in (("gate_proj", "shared_w_gate"), ("up_proj", "shared_w_up"),
                              ("down_proj", "shared_w_down"))]
    if cfg.shared_expert_gate:
      out.append(HFTensor(moe + "shared_expert_gate.weight", ffn + ("w_shared_gate",), None, 1))
  return out


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _hf_shape(ours: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
  if n_in is None:
    return tuple(ours)
  return (int(np.prod(ours[n_in:])), int(np.prod(ours[:n_in])))


def _safetensors_files(paths) -> list[Path]:
  if isinstance(paths, (str, Path)):
    paths = [paths]
  files = []
  for p in map(Path, paths):
    if p.is_dir():
      found = sorted(p.glob("*.safetensors"))
      if not found:
        raise CheckpointError(f"no *.safetensors files in directory {p}.")
      files += found
    elif p.is_file():
      files.append(p)
    else:
      raise CheckpointError(f"safetensors file {p} does not exist.")
  return files


def import_hf_safetensors(paths, cfg: ModelConfig | str, scheme: str,
                          allow_unused: bool = False, dtype=jnp.float32) -> MoETransformer:
  """Build a model from Hugging Face safetensors files.

  Args:
    paths: a ``.safetensors`` file, a folder of them (sharded checkpoints), or a list of files.
    cfg: the model config (or preset name) the checkpoint was made for.
    scheme: tensor naming, one of ``mixtral``, ``olmoe``, ``qwen_moe``, ``deepseek`` (see
      :func:`hf_tensor_map`; DeepSeek attention is expected as plain ``q/k/v/o_proj``).
    allow_unused: drop tensors the model has no place for (e.g. OLMoE's QK-norm, Qwen's
      attention biases) instead of raising; the logits then differ from the original model's.
    dtype: compute dtype of the returned model (parameters are float32).

  Every tensor is read into host memory: meant for small or truncated checkpoints.
  Raises CheckpointError naming missing or misshaped tensors (with the expected shape) and,
  unless ``allow_unused``, the tensors that would be ignored.
  """
  cfg = model_config(cfg)
  files = _safetensors_files(paths)
  spec = hf_tensor_map(cfg, scheme)
  _, state = _abstract_model(cfg, dtype)
  abstract = nnx.to_pure_dict(state)
  with contextlib.ExitStack() as stack:
    handles = [stack.enter_context(safe_open(str(f), framework="numpy")) for f in files]
    return _import_from(handles, files, cfg, scheme, spec, abstract, allow_unused, dtype)


def _import_from(handles, files, cfg, scheme, spec, abstract, allow_unused, dtype):
  """The body of :func:`import_hf_safetensors` with the files open."""
  where = {}
  for h in handles:
    for name in h.keys():
      where[name] = h
  missing, bad = [], []
  for t in spec:
    ours = _get(abstract, t.path).shape
    ours = ours[1:] if t.expert is not None else ours
    want = _hf_shape(ours, t.n_in)
    if t.name not in where:
      missing.append(f"{t.name} {list(want)}")
      continue
    got = tuple(where[t.name].get_slice(t.name).get_shape())
    if got != want:
      bad.append(f"{t.name}: expected {list(want)}, got {list(got)}")
  if missing or bad:
    raise CheckpointError(
        f"safetensors ({', '.join(f.name for f in files)}) do not fit config {cfg.name!r} with "
        f"scheme {scheme!r}: {len(missing)} missing tensors {missing[:12]}"
        f"{' ...' if len(missing) > 12 else ''}; {len(bad)} misshaped {bad[:12]}. Check the "
        f"config (layers, experts, sizes) and the scheme.")
  known = {t.name for t in spec}
  unused = sorted(n for n in where if n not in known and not _DERIVED.search(n))
  if unused and not allow_unused:
    reasons = sorted({why for n in unused for rx, why in _UNSUPPORTED if rx.search(n)})
    raise CheckpointError(
        f"{len(unused)} tensors in the checkpoint have no place in the model: {unused[:12]}"
        f"{' ...' if len(unused) > 12 else ''}"
        f"{' (' + '; '.join(reasons) + ')' if reasons else ''}. Pass allow_unused=True to drop "
        f"them (the model then computes something different from the original), or fix the "
        f"scheme/config.")
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
  for t in spec:
    arr = np.asarray(where[t.name].get_tensor(t.name), np.float32)
    target = _get(params, t.path)
    dest_shape = target.shape[1:] if t.expert is not None else target.shape
    value = arr if t.n_in is None else arr.T.reshape(dest_shape)
    if t.expert is None:
      target[...] = value
    else:
      target[t.expert] = value
  return model_from_params(cfg, params, dtype)


def export_hf_safetensors(model: MoETransformer, path: str | Path, scheme: str,
                          dtype=None, extra: dict[str, np.ndarray] | None = None) -> Path:
  """Write ``model`` as one Hugging Face style ``.safetensors`` file in ``scheme``'s naming.

  ``dtype``: numpy/ml_dtypes dtype of the written tensors (None: float32). ``extra``: additional
  named tensors to write as they are (used by tests to mimic unsupported checkpoint content).
  The inverse of :func:`import_hf_safetensors`.
  """
  params = jax.tree.map(np.asarray, params_dict(model))
  out = {}
  for t in hf_tensor_map(model.cfg, scheme):
    ours = _get(params, t.path)
    if t.expert is not None:
      ours = ours[t.expert]
    arr = ours if t.n_in is None else ours.reshape(_hf_shape(ours.shape, t.n_in)[::-1]).T
    out[t.name] = np.ascontiguousarray(arr.astype(dtype or np.float32))
  out.update(extra or {})
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(out, str(path), metadata={"format": "pt", "scheme": scheme})
  return path
