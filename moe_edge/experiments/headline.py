"""Composing the tables' headline: each method of role ``ours`` against every method of role
``baseline`` (and the best baseline of each setting) and the oracle; roles come from the
placement registry (docs/DESIGN.md, "Adding a placement method")."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from moe_edge.config import model_config
from moe_edge.placement import registry


def ok_rows(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r.get("status") == "ok"]


def settings(rows: Sequence[dict]) -> list[tuple[str, str]]:
  """``(model, cluster)`` pairs in first-appearance order."""
  out = []
  for r in rows:
    key = (r["model"], r["cluster"])
    if key not in out:
      out.append(key)
  return out


def _comparison(rows: Sequence[dict], key: str, baselines: Sequence[str],
                ours: str = "dancemoe") -> dict:
  """``ours``' ``key`` against each baseline and the best baseline, over the settings."""
  by = {(r["model"], r["cluster"], r["method"]): r for r in ok_rows(rows)}
  out = {}
  best_ratios, best_names, labels = [], [], []
  per = {b: [] for b in baselines}
  for model, cluster in settings(rows):
    dm = by.get((model, cluster, ours))
    base = {b: by[(model, cluster, b)][key] for b in baselines if (model, cluster, b) in by}
    if dm is None or not base:
      continue
    for b, v in base.items():
      per[b].append(dm[key] / v)
    best = min(base, key=base.get)
    best_ratios.append(dm[key] / base[best])
    best_names.append(best)
    labels.append(f"{model}/{cluster}")

  def summary(ratios):
    ratios = np.asarray(ratios, dtype=np.float64)
    return dict(settings=int(ratios.size), reduction=float(1.0 - np.exp(np.log(ratios).mean())),
                min_reduction=float(1.0 - ratios.max()), max_reduction=float(1.0 - ratios.min()),
                wins=int((ratios < 1.0 - 1e-12).sum()))

  for b, ratios in per.items():
    if ratios:
      out[b] = summary(ratios)
  if best_ratios:
    out["best"] = dict(summary(best_ratios),
                       per_setting=[dict(setting=s, best=n, reduction=1.0 - x)
                                    for s, n, x in zip(labels, best_names, best_ratios)])
  return out


def headline(rows: Sequence[dict], decode_key: str = "decode_ms",
             prefill_key: str = "prefill_ms", ours: str = "dancemoe") -> dict:
  """``ours`` (a method of role ``ours``) against the methods of role ``baseline``
  (geometric-mean reductions over the settings) and the oracle (the ILP).

  Returns ``{"ours": ours, "decode": ..., "prefill": ..., "bytes": ..., "ilp": [...]}``; the
  three comparisons map
  a baseline (and ``"best"``: per setting the baseline with the lowest value) to
  ``reduction`` (``1 - geomean(ours / baseline)``), ``min_reduction``, ``max_reduction``,
  ``wins`` (settings where ``ours`` is lower) and ``settings``.
  """
  present = {r["method"] for r in ok_rows(rows)}
  baselines = [b for b in registry.names("baseline") if b in present]
  out = dict(ours=ours, decode=_comparison(rows, decode_key, baselines, ours),
             prefill=_comparison(rows, prefill_key, baselines, ours),
             bytes=_comparison(rows, "cross_kb_per_token", baselines, ours), ilp=[])
  by = {(r["model"], r["cluster"], r["method"]): r for r in ok_rows(rows)}
  oracles = [o for o in registry.names("oracle") if o == "ilp"]  # J's optimum; best_known: gaps.py
  for model, cluster in settings(rows):
    opt = next((by[(model, cluster, o)] for o in oracles if (model, cluster, o) in by), None)
    dm = by.get((model, cluster, ours))
    if opt is None or dm is None:
      continue
    m = model_config(model)
    n = int(opt["servers"])
    l, e = m.n_moe_layers, m.n_experts
    out["ilp"].append(dict(
        model=model, cluster=cluster, shape=f"N={n}, L={l}, E={e}",
        binaries=n * l * e + n * n * l * e, status=opt.get("ilp_status", ""),
        proven_gap=float(opt.get("ilp_proven_gap", float("nan"))),
        dancemoe_gap=float(dm["gap_to_ilp"]),
        decode_vs_ilp=float(dm[decode_key] / opt[decode_key] - 1.0),
        prefill_vs_ilp=float(dm[prefill_key] / opt[prefill_key] - 1.0)))
  return out


def ours_present(rows: Sequence[dict]) -> list[str]:
  """The methods of role ``ours`` that have rows, in registration order."""
  present = {r["method"] for r in ok_rows(rows)}
  return [m for m in registry.names("ours") if m in present]


def display_name(method: str) -> str:
  """The name the headline prints for a registered method (its label), else ``method``."""
  return registry.get(method).display if method in registry.names() else method


def pct(x: float) -> str:
  return f"{100 * x:+.1f}%".replace("+-", "-")


def _red(x: float) -> str:
  """A reduction as text: 0.12 -> '12.0% lower', -0.05 -> '5.0% higher'."""
  return f"{100 * abs(x):.1f}% {'lower' if x >= 0 else 'higher'}"


def format_headline(head: dict, label: str = "") -> str:
  """The headline as readable lines (Markdown list items)."""
  lines = []
  who = display_name(head.get("ours", "dancemoe"))
  names = dict(decode="decode latency per token", prefill="prefill latency per request",
               bytes="cross-server bytes per token")
  for key in ("decode", "prefill", "bytes"):
    comp = head[key]
    if "best" not in comp:
      continue
    best = comp["best"]
    per = ", ".join(f"{b} {_red(v['reduction'])} ({v['wins']}/{v['settings']} won, range "
                    f"{pct(-v['max_reduction'])}..{pct(-v['min_reduction'])})"
                    for b, v in comp.items() if b != "best")
    lines.append(f"- **{names[key]}**{label}: {who} is {_red(best['reduction'])} than the "
                 f"best baseline of each setting (geometric mean over {best['settings']} "
                 f"settings; better in {best['wins']}, range {pct(-best['max_reduction'])}.."
                 f"{pct(-best['min_reduction'])}); per baseline: {per}.")
  for g in head.get("ilp", []):
    lines.append(
        f"- **gap to the ILP optimum** ({g['model']} on {g['cluster']}, {g['shape']}: "
        f"{g['binaries']:,} binaries, HiGHS {g['status']}, proven gap "
        f"{100 * g['proven_gap']:.2g}%): {who}'s objective J is {pct(g['dancemoe_gap'])} "
        f"above the optimum; its decode latency is {pct(g['decode_vs_ilp'])} and prefill "
        f"{pct(g['prefill_vs_ilp'])} relative to the ILP placement's (the ILP optimises J, "
        f"not the cost model's latency).")
  return "\n".join(lines)
