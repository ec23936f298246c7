"""Tiny MoE for unit tests: byte-level vocab, 2 MoE layers, 8 experts, top-2, one shared expert."""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="tiny", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
      head_dim=8, n_experts=8, top_k=2, d_ff_expert=16, n_shared_experts=1, d_ff_shared=32,
      norm_topk_prob=True, max_seq_len=64, bytes_per_param=4, source="test fixture")
