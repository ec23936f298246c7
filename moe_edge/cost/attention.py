r"""Attention cost over each request's context, and the KV-cache memory it needs.

The MoE cost model (:mod:`moe_edge.cost.model`) prices the dense part of a step as a roofline of
the dense *weights*; serving also pays for attention over every request's context: decode reads
the whole KV cache of each running request once per step, prefill computes scores of every new
token against its causal context. Those terms, and the KV memory a server must keep for its
requests, are pure functions of the model's attention shape:

Per token and layer the cache holds ``w_kv`` elements of ``b_kv`` bytes (bf16: 2)::

  w_kv = 2 * n_kv_heads * head_dim                 (multi-head / grouped-query attention)
  w_kv = kv_lora_rank + qk_rope_head_dim           (multi-head latent attention, DeepSeek-V2)
  kv_bytes_per_token = n_layers * w_kv * b_kv      (every decoder layer, dense and MoE)

A request at a step processes ``new`` tokens (decode: 1; a prefill chunk: the chunk's length)
and has ``context`` tokens in its cache once the step is done (its earlier tokens plus the new
ones). Token ``i`` of the chunk sits at position ``context - new + i`` and attends to
``context - new + i + 1`` keys (causal), so the step computes::

  keys(context, new) = new * (context - new) + new * (new + 1) / 2      score-value pairs
  attention FLOPs    = n_layers * f_kv * keys                            f_kv per pair:
      f_kv = 4 * n_heads * head_dim                                      (QK^T and AV)
      f_kv = 2 * n_heads * (2 * kv_lora_rank + qk_rope_head_dim)         (MLA, absorbed form)
  attention bytes    = kv_bytes_per_token * context
      (the cached ``context - new`` tokens are read once, the ``new`` ones written once)

A server's attention time alone is the roofline of its requests' summed work,
``max(sum bytes / (mbw eta_b), sum FLOPs / (peak eta_f))`` (:func:`attention_time`); the cost
model folds the work of a step (:func:`step_attention_work`) into the dense weights' roofline
(the weights and the caches stream through the same memory, the matmuls and the scores share
the same units; ``Hardware.dense_time``)::

  dense[n] = max((W_d + A_bytes[n]) / (mbw eta_b), (B[n] F_d + A_flops[n]) / (peak eta_f))

KV memory (admission reserves a request's prompt plus its maximum output; no preemption)::

  reservation(prompt, max_output) = kv_bytes_per_token * (prompt + max_output)
  kv_budget[n] = memory_bytes[n] - W_d - (experts held by n) * W_e

so the memory cap bites on experts and KV together: every replica a placement adds takes
``W_e`` from the requests a server can run at once.
"""
from __future__ import annotations

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.errors import CostError

KV_BYTES_PER_ELEMENT = 2  # the cache is kept in bf16 whatever the weight format


class AttentionCostError(CostError):
  """Attention-cost inputs that cannot describe a real step (negative or inconsistent lengths)."""


def kv_width(model: ModelConfig) -> int:
  """``w_kv``: cached elements per token and layer (module docstring)."""
  if model.kv_lora_rank:
    return int(model.kv_lora_rank + model.qk_rope_head_dim)
  return int(2 * model.n_kv_heads * model.head_dim)


def flops_per_key(model: ModelConfig) -> int:
  """``f_kv``: FLOPs of one query-key pair in one layer (scores and the weighted values)."""
  if model.kv_lora_rank:
    return int(2 * model.n_heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim))
  return int(4 * model.n_heads * model.head_dim)


def kv_bytes_per_token(model: ModelConfig, bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
  """Bytes one token occupies in the KV cache over all ``n_layers`` layers."""
  return int(model.n_layers * kv_width(model) * bytes_per_element)


def _lengths(context, new) -> tuple[np.ndarray, np.ndarray]:
  c = np.asarray(context, dtype=np.float64)
  n = np.asarray(new, dtype=np.float64)
  if np.any(n < 0) or np.any(c < n) or not (np.all(np.isfinite(c)) and np.all(np.isfinite(n))):
    raise AttentionCostError(
        "attention lengths must satisfy 0 <= new <= context (context counts the step's new "
        f"tokens too); got context {c.ravel()[:4].tolist()}..., new {n.ravel()[:4].tolist()}....")
  return c, n


def attention_keys(context, new) -> np.ndarray:
  """Query-key pairs per layer of a step, elementwise over ``context`` and ``new`` (any equal
  or broadcastable shapes ``[...]``): ``new (context - new) + new (new + 1) / 2``."""
  c, n = _lengths(context, new)
  return n * (c - n) + n * (n + 1) / 2


def attention_flops(model: ModelConfig, context, new) -> np.ndarray:
  """``[...]`` attention FLOPs (all layers) of requests with ``context [...]`` tokens after the
  step of which ``new [...]`` are processed in it."""
  return model.n_layers * flops_per_key(model) * attention_keys(context, new)


def attention_bytes(model: ModelConfig, context, new) -> np.ndarray:
  """``[...]`` KV-cache bytes a step moves for requests with ``context [...]`` tokens after it,
  ``new [...]`` of them processed in it: the cached ``context - new`` read once, the new tokens
  written once, so ``kv_bytes_per_token * context``."""
  c, _ = _lengths(context, new)
  return kv_bytes_per_token(model) * c


def attention_time(model: ModelConfig, context, new, mem_bandwidth: float,
                   peak_flops: float) -> float:
  """Roofline seconds of one server's attention at a step: ``max(sum bytes / mem_bandwidth,
  sum FLOPs / peak_flops)`` over its requests ``context [R]``, ``new [R]`` (effective rates)."""
  return float(max(np.sum(attention_bytes(model, context, new)) / mem_bandwidth,
                   np.sum(attention_flops(model, context, new)) / peak_flops))


# --------------------------------------------------------------------------------------------
# KV memory
# --------------------------------------------------------------------------------------------
def kv_reservation_bytes(model: ModelConfig, prompt_tokens, max_output_tokens) -> np.ndarray:
  """``[...]`` bytes admission reserves for requests: their prompt plus their maximum output."""
  p = np.asarray(prompt_tokens, dtype=np.float64)
  o = np.asarray(max_output_tokens, dtype=np.float64)
  if np.any(p < 1) or np.any(o < 1):
    raise AttentionCostError("a request needs at least one prompt token and one output token "
                             "to reserve KV memory for.")
  return kv_bytes_per_token(model) * (p + o)


def kv_budget_bytes(model: ModelConfig, cluster: ClusterConfig,
                    experts_per_server) -> np.ndarray:
  """``[N]`` bytes each server has for KV caches once it holds the dense weights and its
  ``experts_per_server [N]`` routed experts (``memory_bytes - W_d - count * W_e``).

  ``reserved_bytes`` is *not* subtracted: it is the memory placement leaves free for exactly
  this (activations and KV caches). Raises AttentionCostError when a server's experts and dense
  weights already exceed its memory.
  """
  held = np.asarray(experts_per_server, dtype=np.float64)
  if held.shape != (cluster.num_servers,):
    raise AttentionCostError(f"experts_per_server must be [N] = [{cluster.num_servers}], got "
                             f"shape {held.shape}.")
  mem = np.array([s.memory_bytes for s in cluster.servers], dtype=np.float64)
  budget = mem - model.dense_bytes - held * model.expert_bytes
  bad = np.flatnonzero(budget < 0)
  if bad.size:
    n = int(bad[0])
    raise AttentionCostError(
        f"server {n} ({cluster.servers[n].name}) of cluster {cluster.name!r} holds "
        f"{int(held[n])} experts of {model.name!r} plus its dense weights, "
        f"{-budget[n] / 2**30:.2f} GiB more than its memory; place fewer experts there.")
  return budget


def check_kv_fits(model: ModelConfig, cluster: ClusterConfig, experts_per_server,
                  prompt_tokens: int, max_output_tokens: int) -> np.ndarray:
  """``[N]`` KV budgets; raises AttentionCostError naming the first server whose budget cannot
  hold even one request of ``prompt_tokens + max_output_tokens`` tokens."""
  budget = kv_budget_bytes(model, cluster, experts_per_server)
  need = float(kv_reservation_bytes(model, prompt_tokens, max_output_tokens))
  short = np.flatnonzero(budget < need)
  if short.size:
    n = int(short[0])
    raise AttentionCostError(
        f"server {n} ({cluster.servers[n].name}) has {budget[n] / 2**20:.1f} MiB left for KV "
        f"caches after its experts, but one request of {prompt_tokens} + {max_output_tokens} "
        f"tokens of {model.name!r} needs {need / 2**20:.1f} MiB; give the server more memory "
        f"(reserved_bytes) or place fewer experts there.")
  return budget


# --------------------------------------------------------------------------------------------
# Per step and server, from the tokens a step feeds
# --------------------------------------------------------------------------------------------
def step_attention_work(model: ModelConfig, step: np.ndarray, server: np.ndarray,
                        request: np.ndarray, position: np.ndarray, num_steps: int,
                        num_servers: int) -> tuple[np.ndarray, np.ndarray]:
  """``(bytes [S, N], flops [S, N])``: the attention work of every server at every step.

  Args:
    step: ``[T]`` step index in ``0..S-1`` of each fed token.
    server: ``[T]`` the server whose request the token belongs to.
    request: ``[T]`` request id (unique across servers).
    position: ``[T]`` the token's cache position (0-based; a request's tokens of one step are
      its contiguous positions ``context - new .. context - 1``, as the scheduler feeds them).
  Each (step, request) group of ``new`` tokens whose last position is ``context - 1`` costs
  :func:`attention_bytes` and :func:`attention_flops` of ``(context, new)``.
  """
  step = np.asarray(step, dtype=np.int64)
  if step.size == 0:
    return np.zeros((num_steps, num_servers)), np.zeros((num_steps, num_servers))
  request = np.asarray(request, dtype=np.int64)
  position = np.asarray(position, dtype=np.int64)
  lo = int(request.min())
  span = int(request.max()) - lo + 1
  key = step * span + (request - lo)
  uk, first, inv = np.unique(key, return_index=True, return_inverse=True)
  new = np.bincount(inv.ravel(), minlength=uk.size)
  context = np.full(uk.size, -1, dtype=np.int64)
  np.maximum.at(context, inv.ravel(), position + 1)
  cell = step[first] * num_servers + np.asarray(server, dtype=np.int64)[first]
  size = num_steps * num_servers
  b = np.bincount(cell, weights=attention_bytes(model, context, new), minlength=size)
  f = np.bincount(cell, weights=attention_flops(model, context, new), minlength=size)
  return b.reshape(num_steps, num_servers), f.reshape(num_steps, num_servers)
