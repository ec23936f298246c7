"""Hugging Face safetensors import/export for Mixtral, OLMoE, Qwen-MoE and DeepSeek-style naming.

Import checks every tensor before building the model: the expected names and shapes, a floating
dtype (an integer or boolean tensor is refused, not cast) and finite values; each problem names
the tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import safe_open

from moe_edge.config import ModelConfig, model_config
from moe_edge.model.params import (CheckpointError, abstract_model, model_from_params,
                                   params_dict)
from moe_edge.model.transformer import MoETransformer

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
# safetensors dtype codes accepted for weights (cast to float32 on import).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
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
  Raises CheckpointError naming missing or misshaped tensors (with the expected shape),
  non-floating tensors (int, bool: never cast), tensors with NaN or inf values, unreadable
  files and, unless ``allow_unused``, the tensors that would be ignored.
  """
  cfg = model_config(cfg)
  files = _safetensors_files(paths)
  spec = hf_tensor_map(cfg, scheme)
  _, state = abstract_model(cfg, dtype)
  abstract = nnx.to_pure_dict(state)
  with contextlib.ExitStack() as stack:
    handles = [stack.enter_context(_open(f)) for f in files]
    return _import_from(handles, files, cfg, scheme, spec, abstract, allow_unused, dtype)


def _open(path: Path):
  try:
    return safe_open(str(path), framework="numpy")
  except (safetensors.SafetensorError, OSError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated, "
                          f"corrupt or of another format.") from None


def _read_tensor(handle, name: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"safetensors tensor {name} cannot be read ({e}); the file is "
                          f"corrupt.") from None


def _import_from(handles, files, cfg, scheme, spec, abstract, allow_unused, dtype):
  """The body of :func:`import_hf_safetensors` with the files open."""
  where = {}
  for h in handles:
    for name in h.keys():
      where[name] = h
  missing, bad, wrong_dtype = [], [], []
  for t in spec:
    ours = _get(abstract, t.path).shape
    ours = ours[1:] if t.expert is not None else ours
    want = _hf_shape(ours, t.n_in)
    if t.name not in where:
      missing.append(f"{t.name} {list(want)}")
      continue
    sl = where[t.name].get_slice(t.name)
    got = tuple(sl.get_shape())
    if got != want:
      bad.append(f"{t.name}: expected {list(want)}, got {list(got)}")
    if sl.get_dtype() not in FLOAT_DTYPES:
      wrong_dtype.append(f"{t.name} ({sl.get_dtype()})")
  if missing or bad:
    raise CheckpointError(
        f"safetensors ({', '.join(f.name for f in files)}) do not fit config {cfg.name!r} with "
        f"scheme {scheme!r}: {len(missing)} missing tensors {missing[:12]}"
        f"{' ...' if len(missing) > 12 else ''}; {len(bad)} misshaped {bad[:12]}. Check the "
        f"config (layers, experts, sizes) and the scheme.")
  if wrong_dtype:
    raise CheckpointError(
        f"safetensors ({', '.join(f.name for f in files)}): {len(wrong_dtype)} weight tensors "
        f"are not floating point: {wrong_dtype[:12]}{' ...' if len(wrong_dtype) > 12 else ''}; "
        f"weights must be one of {sorted(FLOAT_DTYPES)} (a quantised or corrupt checkpoint "
        f"cannot be imported).")
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
    arr = np.asarray(_read_tensor(where[t.name], t.name), np.float32)
    if not np.all(np.isfinite(arr)):
      n_bad = int(np.size(arr) - np.isfinite(arr).sum())
      raise CheckpointError(
          f"safetensors tensor {t.name} holds {n_bad} non-finite values (NaN or inf) of "
          f"{arr.size}; the checkpoint is corrupt or was saved after a diverged step.")
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
