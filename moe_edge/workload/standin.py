"""Routing statistics for models whose own were never measured: a real model's, reshaped.

DeepSeek-V2-Lite (26 MoE layers, 64 routed experts, top-6) has no measured per-domain routing
counts we may use. OLMoE-1B-7B's real counts (16 layers, 64 experts, top-8; allenai/OLMoE) are
the closest real stand-in: the same 64 experts per layer and the same five domains. Every table
driven by them says so (:data:`STANDIN_NOTE`).

Reshaping (:func:`standin_stats`), no value invented beyond what the reshape needs:

* experts: the source's per-domain *share* of token-choices per expert ``p[d, r, e]`` (rows sum
  to one) is kept exactly; the target's counts are ``k_t * tokens * p`` rounded to integers by
  largest remainder (so every row sums to ``k_t * tokens`` exactly). The target's inclusion
  frequencies are ``k_t p`` (OLMoE's hottest share, 0.122 of layer 7's choices, gives 0.73 at
  top-6: no expert saturates);
* layers: the recorded layers move to the same relative depth, ``round(l (L_t - 1) / (L_s - 1))``
  (OLMoE's 0, 7, 15 of 16 become 0, 12, 25 of 26), and the unrecorded layers are filled as for
  any model (:func:`moe_edge.workload.stats_traces.layer_plan`: nearest recorded layer, experts
  relabelled per layer);
* first choices (``counts_top1``) and cross-layer co-activation (``cross``): dropped, they are
  recorded for OLMoE's top-8 ranks and have no top-6 counterpart (the sampler uses neither).
"""
from __future__ import annotations

import functools

import numpy as np

from moe_edge.config import ModelConfig, model_config
from moe_edge.workload.stats_traces import STATS_MODELS, RoutingStats, StatsError, load_routing_stats

#: Models driven by another model's real statistics: target -> source.
STANDINS = {"deepseek_v2_lite": "olmoe_1b_7b"}
STANDIN_NOTE = ("DeepSeek-V2-Lite's routing is OLMoE-1B-7B's real per-domain statistics (the "
                "closest real stand-in: the same 64 experts per layer; reshaped to 26 layers and "
                "top-6, moe_edge/workload/standin.py)")


def _round_rows(x: np.ndarray, total: np.ndarray) -> np.ndarray:
  """Largest-remainder rounding of ``x [..., E]`` to integers whose rows sum to ``total [...]``."""
  base = np.floor(x).astype(np.int64)
  short = (total - base.sum(-1)).astype(np.int64)
  frac = x - base
  order = np.argsort(-frac, axis=-1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(x.shape[-1])[(None,) * (x.ndim - 1)], axis=-1)
  return base + (rank < short[..., None])


def standin_stats(target: ModelConfig | str, source: str = "olmoe_1b_7b") -> RoutingStats:
  """``source``'s real routing statistics reshaped to ``target``'s layers and top-k (module
  docstring). Raises StatsError when the expert counts differ (no reshape is defined then)."""
  target = model_config(target)
  return _standin(target.name, target.n_moe_layers, target.n_experts, target.top_k, source)


@functools.lru_cache(maxsize=None)
def _standin(name: str, num_layers: int, num_experts: int, top_k: int,
             source: str) -> RoutingStats:
  src = load_routing_stats(source)
  if src.num_experts != num_experts:
    raise StatsError(f"{source}'s statistics have {src.num_experts} experts per layer but "
                     f"{name} has {num_experts}; a stand-in needs the same expert count.")
  share = src.distributions()                                         # [D, R, E]
  tokens = src.tokens_per_domain                                      # [D]
  tok = np.broadcast_to(tokens[:, None], share.shape[:2])
  if np.any(top_k * share > 1.0):
    raise StatsError(f"{source}'s hottest expert takes {share.max():.3f} of the choices; at "
                     f"top-{top_k} it would be chosen by more than every token.")
  counts = _round_rows(top_k * tok[..., None] * share, top_k * tok)
  scale = (num_layers - 1) / max(src.num_layers - 1, 1)
  layers = tuple(int(round(l * scale)) for l in src.layers)
  return RoutingStats(
      name=name, path=f"{src.path} (stand-in: {source} reshaped to {num_layers} layers, "
      f"top-{top_k})", domains=src.domains, layers=layers, num_layers=num_layers,
      num_experts=num_experts, top_k=top_k, counts=counts)


def routing_stats_for(model: str) -> tuple[RoutingStats, str]:
  """``(statistics, caption)`` that drive ``model``: its own measured counts, or a stand-in.

  Raises StatsError naming the models that have statistics when ``model`` has neither.
  """
  if model in STATS_MODELS:
    return load_routing_stats(model), f"{model}'s real per-domain routing statistics"
  if model in STANDINS:
    return standin_stats(model, STANDINS[model]), STANDIN_NOTE
  raise StatsError(f"no routing statistics drive {model!r}: measured ones exist for "
                   f"{', '.join(STATS_MODELS)}, stand-ins for {', '.join(STANDINS)}.")
