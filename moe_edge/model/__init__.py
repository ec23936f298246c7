"""Flax nnx MoE language model.

``router`` (top-k routing, load-balancing loss), ``experts`` (SwiGLU expert math on explicit
weights, the single-device dense reference), ``transformer`` (the model, loss, generation) and
``checkpoint`` (orbax save/restore, Hugging Face safetensors import/export; import it explicitly:
``from moe_edge.model import checkpoint``, it pulls in orbax).
"""
from moe_edge.model.experts import expert_ffn, moe_dense_reference, shared_expert_ffn
from moe_edge.model.router import (RoutingError, check_finite_gates, load_balancing_loss, route,
                                   router_probs)
from moe_edge.model.transformer import (ModelError, MoEBlock, MoETransformer, RoutingInfo,
                                        expert_weights, generate, lm_loss, token_losses)

__all__ = [
    "ModelError", "MoEBlock", "MoETransformer", "RoutingError", "RoutingInfo",
    "check_finite_gates", "expert_ffn", "expert_weights", "generate", "lm_loss",
    "load_balancing_loss", "moe_dense_reference", "route", "router_probs", "shared_expert_ffn",
    "token_losses",
]
