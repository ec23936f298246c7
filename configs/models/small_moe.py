"""The small MoE language model trained on CPU/GPU from the five-domain corpus.

Byte-level (vocab 256), 4 MoE layers, d=256, 16 fine-grained experts of f=128, top-2, Mixtral-style
renormalised gates. About 7.5 M parameters: the shipped bf16 checkpoint stays under 20 MB.
"""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="small_moe", vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
      head_dim=64, n_experts=16, top_k=2, d_ff_expert=128, norm_topk_prob=True,
      max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, bytes_per_param=2,
      aux_loss_coef=0.01, source="moe-edge, trained by experiments/train_small_moe.py")
