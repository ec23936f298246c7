"""Plain numpy (float64, per-token loops) reference of the MoE transformer, for the model tests.

Written independently of moe_edge.model: explicit loops over tokens, experts and heads, so a
mistake in an einsum or a reshape there shows up as a mismatch here.
"""
import numpy as np


def softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def silu(x):
  return x / (1.0 + np.exp(-x))


def route_np(logits, top_k, norm_topk_prob):
  """``logits [T, E]`` -> ``ids [T, k]``, ``gates [T, k]`` (stable order for ties)."""
  p = softmax(logits)
  ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
  gates = np.take_along_axis(p, ids, axis=-1)
  if norm_topk_prob:
    gates = gates / gates.sum(-1, keepdims=True)
  return ids, gates


def ffn_np(x, w_gate, w_up, w_down):
  """One token ``x [d]`` through one SwiGLU FFN."""
  return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_np(x, p, top_k, norm_topk_prob, routing=None):
  """MoE block on ``x [T, d]`` with params dict ``p`` (numpy arrays, names as in MoEBlock).

  Returns ``y [T, d]``, ``ids [T, k]``, ``gates [T, k]``.
  """
  x = np.asarray(x, np.float64)
  logits = x @ p["w_router"]
  if routing is None:
    ids, gates = route_np(logits, top_k, norm_topk_prob)
  else:
    ids, gates = routing
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for r in range(ids.shape[1]):
      e = ids[t, r]
      y[t] += gates[t, r] * ffn_np(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    if "shared_w_gate" in p:
      ys = ffn_np(x[t], p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
      if "w_shared_gate" in p:
        ys = ys / (1.0 + np.exp(-(x[t] @ p["w_shared_gate"][:, 0])))
      y[t] += ys
  return y, ids, gates


def rms_np(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_np(v, pos, theta):
  """``v [D]`` at position ``pos``, Hugging Face rotate_half layout."""
  d = v.shape[0]
  half = d // 2
  out = np.empty_like(v)
  for i in range(half):
    ang = pos * theta ** (-2.0 * i / d)
    c, s = np.cos(ang), np.sin(ang)
    out[i] = v[i] * c - v[i + half] * s
    out[i + half] = v[i + half] * c + v[i] * s
  return out


def attention_np(x, p, cfg):
  """Causal GQA attention for one sequence ``x [S, d]``; params wq/wk/wv/wo as in Attention."""
  s = x.shape[0]
  groups = cfg.n_heads // cfg.n_kv_heads
  out = np.zeros_like(x)
  for h in range(cfg.n_heads):
    kv = h // groups
    q = np.stack([rope_np(x[t] @ p["wq"][:, h], t, cfg.rope_theta) for t in range(s)])
    k = np.stack([rope_np(x[t] @ p["wk"][:, kv], t, cfg.rope_theta) for t in range(s)])
    v = x @ p["wv"][:, kv]
    for t in range(s):
      scores = (q[t] @ k[:t + 1].T) / np.sqrt(cfg.head_dim)
      o = softmax(scores) @ v[:t + 1]
      out[t] += o @ p["wo"][h]
  return out


def transformer_np(tokens, params, cfg):
  """Full model on ``tokens [B, S]`` with ``params`` = params_dict(model) as float64 numpy.

  Returns ``logits [B, S, V]`` and ``expert_ids [B, S, L, k]``.
  """
  all_logits, all_ids = [], []
  for seq in np.asarray(tokens):
    x = params["embed"][seq].astype(np.float64)
    ids_layers = []
    for i in range(cfg.n_layers):
      lp = params["layers"][i]
      x = x + attention_np(rms_np(x, lp["attn_norm"]["scale"], cfg.norm_eps), lp["attn"], cfg)
      h = rms_np(x, lp["ffn_norm"]["scale"], cfg.norm_eps)
      if i < cfg.first_dense_layers:
        f = lp["ffn"]
        x = x + np.stack([ffn_np(t, f["w_gate"], f["w_up"], f["w_down"]) for t in h])
      else:
        y, ids, _ = moe_np(h, lp["ffn"], cfg.top_k, cfg.norm_topk_prob)
        x = x + y
        ids_layers.append(ids)
    x = rms_np(x, params["final_norm"]["scale"], cfg.norm_eps)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    all_logits.append(x @ head)
    all_ids.append(np.stack(ids_layers, axis=1))
  return np.stack(all_logits), np.stack(all_ids)


def to_np64(tree):
  """Nested dict of arrays -> nested dict of float64 numpy arrays."""
  if isinstance(tree, dict):
    return {k: to_np64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)
