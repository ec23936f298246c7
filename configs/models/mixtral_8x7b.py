"""Mixtral-8x7B-v0.1: numbers from the Hugging Face config.json of mistralai/Mixtral-8x7B-v0.1.

hidden_size 4096, intermediate_size 14336, 32 layers, 32 heads (8 KV), 8 experts, 2 per token,
softmax over the top-2 logits (renormalised), vocab 32000, rope_theta 1e6, rms_norm_eps 1e-5.
"""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="mixtral_8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
      n_kv_heads=8, head_dim=128, n_experts=8, top_k=2, d_ff_expert=14336,
      norm_topk_prob=True, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
      bytes_per_param=2, source="mistralai/Mixtral-8x7B-v0.1 config.json")
