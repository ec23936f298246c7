"""Qwen1.5-MoE-A2.7B: numbers from the Hugging Face config.json of Qwen/Qwen1.5-MoE-A2.7B.

hidden_size 2048, 24 layers, 16 heads (16 KV), 60 experts (moe_intermediate_size 1408), 4 per
token, one shared expert of shared_expert_intermediate_size 5632 gated by sigmoid, norm_topk_prob
false, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6.
"""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="qwen1_5_moe_a2_7b", vocab_size=151936, d_model=2048, n_layers=24, n_heads=16,
      n_kv_heads=16, head_dim=128, n_experts=60, top_k=4, d_ff_expert=1408,
      n_shared_experts=1, d_ff_shared=5632, shared_expert_gate=True, norm_topk_prob=False,
      max_seq_len=8192, rope_theta=1e6, norm_eps=1e-6, bytes_per_param=2,
      source="Qwen/Qwen1.5-MoE-A2.7B config.json")
