r"""Expert similarity, computed offline, two ways: from the weights and from calibration outputs.

Every routed expert is a SwiGLU FFN ``y = down(silu(x @ gate) * (x @ up))`` with ``gate, up
[d, f]`` and ``down [f, d]`` (columns ``g_i, u_i`` of gate/up and rows ``w_i`` of down for hidden
unit ``i``). Similarities are ``[E, E]`` matrices of one layer, ``sim[a, a] = 1``.

**Weights, "response" (default).** Near ``x = 0``, ``silu(a) = a / 2 + O(a^2)``, so an expert's
leading-order response is the quadratic form ``y(x) ~ 1/2 sum_i (x . g_i)(x . u_i) w_i``, i.e.
the symmetric tensor ``Q = 1/2 sum_i sym(g_i (x) u_i) (x) w_i`` in ``R^{d x d x d}``.
``sim[a, b]`` is the cosine of ``Q_a`` and ``Q_b``. It is invariant to permuting an expert's
hidden units (two experts computing the same function in a different unit order have similarity
1), which plain weight cosines are not. It never builds ``Q``: with the ``[f, f]`` Gram matrices
``G = g_a^T g_b``, ``U = u_a^T u_b``, ``X = g_a^T u_b``, ``Y = u_a^T g_b``, ``W = w_a w_b^T``,
``<Q_a, Q_b> = 1/2 sum_ij (G * U + X * Y) * W`` (cost ``O(E^2 f^2 d)``).

**Weights, "flat".** Cosine of the concatenated flattened ``(gate, up, down)``, each matrix
scaled to unit Frobenius norm first. Simple, but blind to hidden-unit permutations: experts
trained from independent random initialisations come out near 0 whatever they compute.

**Outputs.** ``sim[a, b] = sum_t w[t, a] cos(FFN_a(x_t), FFN_b(x_t)) / sum_t w[t, a]`` over
calibration hidden states ``x_t`` (the MoE inputs of held-out text, captured through the model's
``moe_fn`` hook by :func:`capture_moe_inputs`). With uniform weights it is the mean cosine of the
two experts' outputs on the same inputs (symmetric); with ``w[t, a] = 1`` where token ``t`` was
routed to ``a`` (:func:`routed_weights`) it measures how well ``b`` imitates ``a`` *on the tokens
``a`` actually gets* (row-wise, not symmetric), which is what substitution needs.

:func:`rank_correlation` compares two similarity matrices by Spearman's rho over the off-diagonal
entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from moe_edge.core.errors import MoeEdgeError
from moe_edge.extensions.transform import TransformedMoE, identity_transform
from moe_edge.model.transformer import expert_weights

WEIGHT_KINDS = ("response", "flat")
_EPS = 1e-12


class SimilarityError(MoeEdgeError):
  """Similarity inputs are malformed (shapes, kinds, empty calibration)."""


def _check_experts(w_gate, w_up, w_down) -> tuple[int, int, int]:
  if w_gate.ndim != 3 or w_up.shape != w_gate.shape:
    raise SimilarityError(f"w_gate and w_up must both be [E, d, f], got {tuple(w_gate.shape)} and "
                          f"{tuple(w_up.shape)}.")
  e, d, f = w_gate.shape
  if tuple(w_down.shape) != (e, f, d):
    raise SimilarityError(f"w_down must be [E, f, d] = {[e, f, d]}, got {tuple(w_down.shape)}.")
  return e, d, f


def _cosine_from_gram(gram: np.ndarray) -> np.ndarray:
  norm = np.sqrt(np.maximum(np.diag(gram), _EPS))
  sim = gram / norm[:, None] / norm[None, :]
  np.fill_diagonal(sim, 1.0)
  return np.clip(sim, -1.0, 1.0).astype(np.float32)


def weight_similarity(w_gate, w_up, w_down, kind: str = "response") -> np.ndarray:
  """``[E, E]`` float32 similarity of one layer's experts from their weights (module docstring).

  Args:
    w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``.
    kind: ``"response"`` (quadratic-response cosine, hidden-unit permutation invariant) or
      ``"flat"`` (cosine of normalised flattened weights).
  """
  e, d, f = _check_experts(w_gate, w_up, w_down)
  g, u, w = (np.asarray(a, np.float64) for a in (w_gate, w_up, w_down))
  if kind == "flat":
    parts = [a.reshape(e, -1) / np.linalg.norm(a.reshape(e, -1), axis=1, keepdims=True).clip(
        _EPS) for a in (g, u, w)]
    v = np.concatenate(parts, axis=1)
    return _cosine_from_gram(np.einsum("ap,bp->ab", v, v))
  if kind != "response":
    raise SimilarityError(f"unknown weight similarity kind {kind!r}; use one of {WEIGHT_KINDS}.")
  gram = np.empty((e, e))
  for a in range(e):  # one row of pairs at a time keeps memory at O(E f^2)
    gg = np.einsum("di,bdj->bij", g[a], g)
    uu = np.einsum("di,bdj->bij", u[a], u)
    gu = np.einsum("di,bdj->bij", g[a], u)
    ug = np.einsum("di,bdj->bij", u[a], g)
    ww = np.einsum("id,bjd->bij", w[a], w)
    gram[a] = 0.5 * np.einsum("bij,bij->b", gg * uu + gu * ug, ww)
  return _cosine_from_gram(gram)


def layer_weight_similarity(weights: dict, kind: str = "response") -> np.ndarray:
  """``[L, E, E]`` for stacked weights ``{"w_gate": [L,E,d,f], "w_up": ..., "w_down": [L,E,f,d]}``
  (e.g. ``moe_edge.model.transformer.expert_weights(model)``)."""
  wg, wu, wd = (np.asarray(weights[k]) for k in ("w_gate", "w_up", "w_down"))
  if wg.ndim != 4:
    raise SimilarityError(f"stacked expert weights must be [L, E, d, f], got {wg.shape}.")
  return np.stack([weight_similarity(wg[l], wu[l], wd[l], kind) for l in range(wg.shape[0])])


# --------------------------------------------------------------------------------------------
# Outputs on calibration hidden states
# --------------------------------------------------------------------------------------------
@jax.jit
def _normalised_outputs(x, w_gate, w_up, w_down):
  """``[E, T, d]`` unit-norm outputs of every expert on ``x [T, d]``."""
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x, w_gate)) * jnp.einsum("td,edf->etf", x, w_up)
  y = jnp.einsum("etf,efd->etd", h, w_down)
  return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), _EPS)


def output_similarity(x, w_gate, w_up, w_down, weights=None, chunk: int = 2048) -> np.ndarray:
  """``[E, E]`` float32 weighted mean cosine of expert outputs on calibration states.

  Args:
    x: ``[T, d]`` MoE-layer inputs (hidden states after the FFN norm).
    w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``.
    weights: ``[T, E]`` non-negative weight of token ``t`` in row ``a`` (default uniform); a row
      whose weights sum to zero falls back to uniform weights.
    chunk: tokens per block (bounds memory at ``E * chunk * d`` floats).
  """
  e, d, _ = _check_experts(w_gate, w_up, w_down)
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0:
    raise SimilarityError(f"calibration states must be a non-empty [T, d] = [T, {d}] array, got "
                          f"{x.shape}.")
  t = x.shape[0]
  w = np.ones((t, e), np.float64) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (t, e) or np.any(w < 0) or not np.all(np.isfinite(w)):
    raise SimilarityError(f"weights must be a finite non-negative [T, E] = [{t}, {e}] array, got "
                          f"shape {w.shape}.")
  w = np.where(w.sum(axis=0, keepdims=True) > 0, w, 1.0)
  num = np.zeros((e, e))
  wts = [jnp.asarray(a, jnp.float32) for a in (w_gate, w_up, w_down)]
  for lo in range(0, t, chunk):
    yn = _normalised_outputs(jnp.asarray(x[lo:lo + chunk]), *wts)
    cos = np.asarray(jnp.einsum("atd,btd->tab", yn, yn), np.float64)  # [t, E, E]
    num += np.einsum("ta,tab->ab", w[lo:lo + chunk], cos)
  sim = num / w.sum(axis=0)[:, None]
  np.fill_diagonal(sim, 1.0)
  return np.clip(sim, -1.0, 1.0).astype(np.float32)


def routed_weights(expert_ids, n_experts: int) -> np.ndarray:
  """``[T, E]`` float: 1 where token ``t`` chose expert ``e`` (``expert_ids [T, k]``)."""
  ids = np.asarray(expert_ids)
  out = np.zeros((ids.shape[0], n_experts))
  np.put_along_axis(out, ids, 1.0, axis=1)
  return out


def capture_moe_inputs(model, tokens) -> tuple[np.ndarray, np.ndarray]:
  """Run ``model`` on ``tokens [B, S]`` and return what every MoE layer received.

  Returns ``x [L, B*S, d]`` float32 (the inputs of the routed experts, captured through the
  ``moe_fn`` hook) and ``expert_ids [L, B*S, k]`` (the router's choices).
  """
  tokens = jnp.asarray(tokens, jnp.int32)

  @nnx.jit
  def run(m, tok):
    fn = TransformedMoE(identity_transform, record=True)
    m(tok, moe_fn=fn)
    rec = fn.stacked()
    return rec["x"], rec["expert_ids"]

  x, ids = run(model, tokens)
  b, s, l, d = x.shape
  x = np.asarray(x, np.float32).transpose(2, 0, 1, 3).reshape(l, b * s, d)
  ids = np.asarray(ids).transpose(2, 0, 1, 3).reshape(l, b * s, -1)
  return x, ids


def calibration_similarity(model, tokens, routed: bool = True, chunk: int = 2048) -> np.ndarray:
  """``[L, E, E]`` output similarity of every MoE layer on the MoE inputs of ``tokens [B, S]``;
  ``routed`` weights each row by the tokens routed to that expert (module docstring)."""
  x, ids = capture_moe_inputs(model, tokens)
  w = expert_weights(model)
  e = w["w_gate"].shape[1]
  return np.stack([output_similarity(x[l], w["w_gate"][l], w["w_up"][l], w["w_down"][l],
                                     routed_weights(ids[l], e) if routed else None, chunk)
                   for l in range(x.shape[0])])


def rank_correlation(a, b) -> float:
  """Spearman's rho between two ``[E, E]`` similarity matrices over their off-diagonal entries
  (all ordered pairs, so asymmetric matrices are compared entry by entry)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
    raise SimilarityError(f"rank_correlation needs two [E, E] matrices with E >= 3, got "
                          f"{a.shape} and {b.shape}.")
  off = ~np.eye(a.shape[0], dtype=bool)
  rho = stats.spearmanr(a[off], b[off]).statistic
  return float(rho)


def random_similarity(n_layers: int, n_experts: int, seed: int) -> np.ndarray:
  """``[L, E, E]`` uniform random similarities (diagonal 1): the no-information control."""
  sim = np.random.default_rng(seed).uniform(-1.0, 1.0, (n_layers, n_experts, n_experts))
  sim[:, np.arange(n_experts), np.arange(n_experts)] = 1.0
  return sim.astype(np.float32)
