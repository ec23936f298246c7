"""Activation statistics of a trace: how local and how skewed each server's routing is.

For server ``n`` and layer ``l`` with expert distribution ``p[n, l, :]`` (share of the server's
token-choices; from :meth:`ActivationTrace.counts`):

* own-hot coverage: share of the server's token-choices that its own hottest ``m`` experts get
  (``m = round(hot_fraction * E)``; uniform routing gives ``m / E``). This is what a server
  holding only ``m`` experts of the layer could serve locally at best.
* cluster-hot coverage: the same for the ``m`` hottest experts of the whole cluster's traffic;
  the gap to own-hot coverage is what per-server (activation-aware) placement can gain over one
  global hot set.
* entropy in bits (``log2 E`` = uniform).
* total-variation distance ``0.5 * sum_e |p_a - p_b|`` between servers, per layer.

All are plug-in estimates from the trace's counts: with few tokens per server, sampling noise
biases the entropy down and the TV distance up (about ``sqrt(E / tokens)`` for TV).
"""
from __future__ import annotations

import numpy as np

from moe_edge.workload.traces import ActivationTrace, TraceError


def _top_m_share(counts: np.ndarray, hot: np.ndarray) -> np.ndarray:
  """Share of ``counts [..., E]`` on the experts where ``hot [..., E]`` is true."""
  total = counts.sum(-1)
  return np.where(total > 0, (counts * hot).sum(-1) / np.maximum(total, 1), np.nan)


def _hot_mask(counts: np.ndarray, m: int) -> np.ndarray:
  """``[..., E]`` bool: the ``m`` largest entries of the last axis (ties by lower id)."""
  order = np.argsort(-counts, axis=-1, kind="stable")[..., :m]
  mask = np.zeros(counts.shape, dtype=bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def summarize(trace: ActivationTrace, hot_fraction: float = 0.25) -> dict:
  """Per-server, per-layer activation statistics of ``trace``.

  Returns a dict with ``model``, ``num_servers`` (N), ``num_layers`` (L), ``num_experts`` (E),
  ``top_k``, ``hot_fraction``, ``hot_m`` (m), ``tokens [N]``, ``coverage [N, L]`` (own-hot),
  ``coverage_cluster [N, L]``, ``entropy_bits [N, L]``, ``max_entropy_bits`` (log2 E),
  ``tv [L, N, N]``, ``tv_mean [L]``, ``tv_max [L]`` (over server pairs that have tokens; NaN
  with fewer than two). Servers without tokens get NaN rows.
  """
  if not 0.0 < hot_fraction <= 1.0:
    raise TraceError(f"hot_fraction must be in (0, 1], got {hot_fraction}.")
  counts = trace.counts().astype(np.float64)  # [N, L, E]
  n, l, e = counts.shape
  m = min(e, max(1, int(round(hot_fraction * e))))
  tokens = trace.tokens_per_server()
  coverage = _top_m_share(counts, _hot_mask(counts, m))
  cluster = counts.sum(0)  # [L, E]
  coverage_cluster = _top_m_share(counts, _hot_mask(cluster, m)[None])
  total = counts.sum(-1, keepdims=True)
  p = counts / np.maximum(total, 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ent = -np.sum(np.where(p > 0, p * np.log2(p), 0.0), axis=-1)
  ent = np.where(total[..., 0] > 0, ent, np.nan)
  tv = 0.5 * np.abs(p[:, None] - p[None, :]).sum(-1).transpose(2, 0, 1)  # [L, N, N]
  live = np.flatnonzero(tokens > 0)
  iu = np.triu_indices(len(live), 1)
  pairs = tv[:, live][:, :, live][:, iu[0], iu[1]]  # [L, pairs]
  tv_mean = pairs.mean(-1) if pairs.shape[1] else np.full(l, np.nan)
  tv_max = pairs.max(-1) if pairs.shape[1] else np.full(l, np.nan)
  return dict(model=trace.model, num_servers=n, num_layers=l, num_experts=e,
              top_k=trace.top_k, hot_fraction=hot_fraction, hot_m=m, tokens=tokens,
              coverage=coverage, coverage_cluster=coverage_cluster, entropy_bits=ent,
              max_entropy_bits=float(np.log2(e)), tv=tv, tv_mean=tv_mean, tv_max=tv_max)


def _pct(x: float) -> str:
  return "   n/a" if np.isnan(x) else f"{100 * x:5.1f}%"


def format_summary(summary: dict, title: str = "") -> str:
  """A readable table of :func:`summarize`'s output (per server, then per layer)."""
  s = summary
  n, l, e, m = s["num_servers"], s["num_layers"], s["num_experts"], s["hot_m"]
  lines = []
  if title:
    lines.append(title)
  lines += [f"model {s['model']}: {n} servers, {l} MoE layers, {e} experts, top-{s['top_k']}; "
            f"hot set m = {m} experts per layer ({100 * m / e:.0f}% of E; uniform routing "
            f"covers {100 * m / e:.1f}%); entropy of uniform routing = log2 E = "
            f"{s['max_entropy_bits']:.2f} bits",
            "",
            "per server (mean over layers):",
            f"  {'server':>6} {'tokens':>10}  {'own-hot cov.':>12}  {'cluster-hot cov.':>16}  "
            f"{'entropy (bits)':>14}"]
  with np.errstate(invalid="ignore"):
    for i in range(n):
      row = s["coverage"][i]
      if np.all(np.isnan(row)):
        lines.append(f"  {i:>6} {0:>10,}  {'(no tokens)':>12}")
        continue
      lines.append(f"  {i:>6} {int(s['tokens'][i]):>10,}  {_pct(np.mean(row)):>12}  "
                   f"{_pct(np.mean(s['coverage_cluster'][i])):>16}  "
                   f"{np.mean(s['entropy_bits'][i]):>14.2f}")
    wide = n <= 8
    cov_head = (" ".join(f"{'s' + str(i):>6}" for i in range(n)) if wide
                else " ".join(f"{h:>6}" for h in ("min", "mean", "max")))
    lines += ["", "per layer (own-hot coverage " + ("per server" if wide else "over servers") +
              "; entropy: mean over servers; TV: over server pairs):",
              f"  {'layer':>5}  {cov_head}  {'entropy':>7}  {'TV mean':>7}  {'TV max':>6}"]
    for j in range(l):
      cov = s["coverage"][:, j]
      cells = (" ".join(_pct(c) for c in cov) if wide else
               " ".join(_pct(f(cov)) for f in (np.nanmin, np.nanmean, np.nanmax)))
      lines.append(f"  {j:>5}  {cells}  {np.nanmean(s['entropy_bits'][:, j]):>7.2f}  "
                   f"{s['tv_mean'][j]:>7.3f}  {s['tv_max'][j]:>6.3f}")
  return "\n".join(lines)
