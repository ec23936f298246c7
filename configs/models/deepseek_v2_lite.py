"""DeepSeek-V2-Lite: numbers from the Hugging Face config.json of deepseek-ai/DeepSeek-V2-Lite.

hidden_size 2048, 27 layers of which the first (first_k_dense_replace=1) is dense with
intermediate_size 10944; 64 routed experts (moe_intermediate_size 1408), 6 per token, 2 shared
experts, norm_topk_prob false, vocab 102400, 16 heads. DeepSeek's MLA attention (kv_lora_rank 512,
qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128) is modelled here as standard
multi-head attention with head_dim 128: expert placement only needs the dense-weight byte count,
which this approximates (MLA is smaller, so dense memory is slightly over-estimated). The KV cache
and the attention cost (moe_edge/cost/attention.py) follow MLA: kv_lora_rank 512 plus the 64-wide
RoPE key per token and layer.
"""
from moe_edge.config import ModelConfig


def get_config() -> ModelConfig:
  return ModelConfig(
      name="deepseek_v2_lite", vocab_size=102400, d_model=2048, n_layers=27, n_heads=16,
      n_kv_heads=16, head_dim=128, n_experts=64, top_k=6, d_ff_expert=1408,
      n_shared_experts=2, d_ff_shared=1408, first_dense_layers=1, d_ff_dense=10944,
      norm_topk_prob=False, kv_lora_rank=512, qk_rope_head_dim=64, max_seq_len=163840,
      rope_theta=10000.0, norm_eps=1e-6, bytes_per_param=2,
      source="deepseek-ai/DeepSeek-V2-Lite config.json (MLA approximated)")
