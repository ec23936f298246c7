"""OLMoE-1B-7B-0924: numbers from the Hugging Face config.json of allenai/OLMoE-1B-7B-0924.

hidden_size 2048, intermediate_size 1024, 16 layers, 16 heads (16 KV), 64 experts, 8 per token,
norm_topk_prob false, vocab 50304, rope_theta 10000, rms_norm_eps 1e-5, max_position 4096.
"""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="olmoe_1b_7b", vocab_size=50304, d_model=2048, n_layers=16, n_heads=16,
      n_kv_heads=16, head_dim=128, n_experts=64, top_k=8, d_ff_expert=1024,
      norm_topk_prob=False, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
      bytes_per_param=2, source="allenai/OLMoE-1B-7B-0924 config.json")
