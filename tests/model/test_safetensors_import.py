"""Hugging Face safetensors import for every naming scheme, and its error messages."""
import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from moe_edge.config import model_config
from moe_edge.model import checkpoint as ckpt
from moe_edge.model.transformer import MoETransformer

TINY = model_config("tiny")
NO_SHARED = dataclasses.replace(TINY, n_shared_experts=0, d_ff_shared=0)
CONFIGS = {
    "mixtral": NO_SHARED,
    "olmoe": dataclasses.replace(NO_SHARED, norm_topk_prob=False, n_kv_heads=4),
    "qwen_moe": dataclasses.replace(TINY, shared_expert_gate=True, norm_topk_prob=False),
    "deepseek": dataclasses.replace(TINY, n_layers=3, first_dense_layers=1, d_ff_dense=40,
                                    n_shared_experts=2, d_ff_shared=8, norm_topk_prob=False),
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_export_import_reproduces_logits(scheme, tmp_path):
  cfg = CONFIGS[scheme]
  model = MoETransformer(cfg, nnx.Rngs(1))
  path = ckpt.export_hf_safetensors(model, tmp_path / "model.safetensors", scheme)
  back = ckpt.import_hf_safetensors(path, cfg, scheme)
  want, aux = model(TOKENS)
  got, aux2 = back(TOKENS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(aux2["expert_ids"]), np.asarray(aux["expert_ids"]))


def test_hf_layout_and_transposes(tmp_path):
  """Names and [out, in] layout of the written tensors, checked against the params directly."""
  cfg = CONFIGS["qwen_moe"]
  model = MoETransformer(cfg, nnx.Rngs(2))
  path = ckpt.export_hf_safetensors(model, tmp_path / "q.safetensors", "qwen_moe")
  t = safetensors.numpy.load_file(str(path))
  p = ckpt.params_dict(model)
  d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
  q = t["model.layers.1.self_attn.q_proj.weight"]
  assert q.shape == (h * hd, d)
  # row (head 2, dim 3) of q_proj is the input->output column wq[:, 2, 3]
  np.testing.assert_array_equal(q[2 * hd + 3], np.asarray(p["layers"][1]["attn"]["wq"])[:, 2, 3])
  o = t["model.layers.0.self_attn.o_proj.weight"]
  np.testing.assert_array_equal(o[:, 1 * hd + 4], np.asarray(p["layers"][0]["attn"]["wo"])[1, 4])
  w2 = t["model.layers.0.mlp.experts.5.down_proj.weight"]
  np.testing.assert_array_equal(w2, np.asarray(p["layers"][0]["ffn"]["w_down"])[5].T)
  assert t["model.layers.0.mlp.gate.weight"].shape == (cfg.n_experts, d)
  assert t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, d)
  assert t["lm_head.weight"].shape == (cfg.vocab_size, d)
  assert len(t) == len(ckpt.hf_tensor_map(cfg, "qwen_moe"))


def test_sharded_bf16_checkpoint(tmp_path):
  """A folder of shards in bfloat16 loads; values are the bf16-rounded weights."""
  cfg = CONFIGS["mixtral"]
  model = MoETransformer(cfg, nnx.Rngs(3))
  full = safetensors.numpy.load_file(str(ckpt.export_hf_safetensors(
      model, tmp_path / "all.safetensors", "mixtral", dtype=ml_dtypes.bfloat16)))
  (tmp_path / "all.safetensors").unlink()
  names = sorted(full)
  half = len(names) // 2
  for i, part in enumerate((names[:half], names[half:])):
    safetensors.numpy.save_file({n: full[n] for n in part},
                                str(tmp_path / f"model-0000{i + 1}-of-00002.safetensors"))
  back = ckpt.import_hf_safetensors(tmp_path, cfg, "mixtral")
  w = np.asarray(ckpt.params_dict(back)["layers"][1]["ffn"]["w_gate"])[3]
  ref = full["model.layers.1.block_sparse_moe.experts.3.w1.weight"].astype(np.float32).T
  np.testing.assert_array_equal(w, ref)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  cfg = CONFIGS["mixtral"]
  model = MoETransformer(cfg, nnx.Rngs(4))
  path = ckpt.export_hf_safetensors(model, tmp_path / "m.safetensors", "mixtral")
  t = safetensors.numpy.load_file(str(path))
  name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
  del t[name]
  safetensors.numpy.save_file(t, str(tmp_path / "missing.safetensors"))
  with pytest.raises(ckpt.CheckpointError, match=rf"missing.*{name} \[16, 32\]"):
    ckpt.import_hf_safetensors(tmp_path / "missing.safetensors", cfg, "mixtral")
  t = safetensors.numpy.load_file(str(path))
  t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  safetensors.numpy.save_file(t, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ckpt.CheckpointError,
                     match=r"k_proj.weight: expected \[16, 32\], got \[8, 32\]"):
    ckpt.import_hf_safetensors(tmp_path / "bad.safetensors", cfg, "mixtral")


def test_unsupported_tensors_raise_unless_allowed(tmp_path):
  cfg = CONFIGS["olmoe"]
  model = MoETransformer(cfg, nnx.Rngs(5))
  qk = {"model.layers.0.self_attn.q_norm.weight": np.ones(cfg.n_heads * cfg.head_dim, np.float32),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  path = ckpt.export_hf_safetensors(model, tmp_path / "o.safetensors", "olmoe", extra=qk)
  with pytest.raises(ckpt.CheckpointError, match="q_norm.*QK-norm.*allow_unused=True"):
    ckpt.import_hf_safetensors(path, cfg, "olmoe")
  back = ckpt.import_hf_safetensors(path, cfg, "olmoe", allow_unused=True)
  np.testing.assert_array_equal(np.asarray(back(TOKENS)[0]), np.asarray(model(TOKENS)[0]))


def test_scheme_config_mismatch():
  with pytest.raises(ckpt.CheckpointError, match="shared experts"):
    ckpt.hf_tensor_map(TINY, "mixtral")
  with pytest.raises(ckpt.CheckpointError, match="unknown safetensors scheme"):
    ckpt.hf_tensor_map(TINY, "llama")


@pytest.fixture(scope="module")
def mixtral_tensors(tmp_path_factory):
  """The tensors of a real exported tiny Mixtral-style checkpoint."""
  path = tmp_path_factory.mktemp("st") / "m.safetensors"
  ckpt.export_hf_safetensors(MoETransformer(CONFIGS["mixtral"], nnx.Rngs(6)), path, "mixtral")
  return path, safetensors.numpy.load_file(str(path))


@pytest.mark.parametrize("name,value,fragment", [
    ("model.layers.0.block_sparse_moe.experts.1.w1.weight", "int32",
     r"not floating point: \['model.layers.0.block_sparse_moe.experts.1.w1.weight \(I32\)'\]"),
    ("model.layers.1.input_layernorm.weight", "bool",
     r"not floating point: \['model.layers.1.input_layernorm.weight \(BOOL\)'\]"),
    ("model.layers.1.self_attn.v_proj.weight", "nan",
     r"tensor model.layers.1.self_attn.v_proj.weight holds 1 non-finite values"),
    ("lm_head.weight", "inf", r"tensor lm_head.weight holds 3 non-finite values"),
])
def test_wrong_dtype_and_non_finite_tensors_are_named(tmp_path, mixtral_tensors, name, value,
                                                      fragment):
  """int32 and bool tensors were cast silently (logits off by 4.98 and 2.91), NaN propagated."""
  _, tensors = mixtral_tensors
  t = dict(tensors)
  if value in ("int32", "bool"):
    t[name] = np.ones_like(t[name]).astype(value)
  else:
    t[name] = t[name].copy()
    t[name].flat[:1 if value == "nan" else 3] = np.nan if value == "nan" else np.inf
  path = tmp_path / "hostile.safetensors"
  safetensors.numpy.save_file(t, str(path))
  with pytest.raises(ckpt.CheckpointError, match=fragment):
    ckpt.import_hf_safetensors(path, CONFIGS["mixtral"], "mixtral")


def test_truncated_and_foreign_files_are_named(tmp_path, mixtral_tensors):
  path, _ = mixtral_tensors
  raw = path.read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ckpt.CheckpointError, match=r"cut.safetensors is not a readable safetensors "
                                                 r"file .*truncated, corrupt"):
    ckpt.import_hf_safetensors(cut, CONFIGS["mixtral"], "mixtral")
  text = tmp_path / "notes.safetensors"
  text.write_text("these are not weights\n")
  with pytest.raises(ckpt.CheckpointError, match=r"notes.safetensors is not a readable"):
    ckpt.import_hf_safetensors(text, CONFIGS["mixtral"], "mixtral")
