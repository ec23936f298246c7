"""Each method's expected request latency and its gap to ``best_known`` and the lower bound.

Two views of one placement (docs/DESIGN.md, "Experiments"):

* **evaluated**: ``request_ms``, the mean request latency
  (:mod:`moe_edge.cost.request_latency`) of the decode and prefill step times the placement
  gets on the *evaluation* trace, for the tables' request workload (``request_rate`` requests/s
  per server, prompts and outputs from the config);
* **planned**: ``planned_request_ms`` / ``planned_decode_ms``, the same latency and the decode
  step on the expected counts of the *profiling* problem: what ``latency_search`` minimises and
  what the proven lower bound (``placement/bounds.py``) bounds. ``gap_to_best_known`` and
  ``gap_to_bound`` compare planned values (like "J vs ILP", which is on the profiling statistics
  too), so they measure the optimiser, not the profile-to-evaluation shift.

A setting is *unreachable* for a goal "``r`` below the best baseline" when the bound of the
planned value is above ``(1 - r)`` times the best baseline's planned value: no placement can meet
it under the cost model. :func:`format_goal_table` states it per setting ("unreachable
(bound)") with the largest reduction the bound leaves; :func:`format_goals` gives the geometric
means over every setting and over the settings the bound does not rule out.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import PlacementProblem
from moe_edge.cost.request_latency import request_latency, workload_batches
from moe_edge.placement.bounds import latency_lower_bound
from moe_edge.placement.layer_state import LayerState

GAP_COLUMNS = ("request_ms", "planned_request_ms", "planned_decode_ms", "gap_to_best_known",
               "bound_request_ms", "bound_decode_ms", "gap_to_bound", "decode_gap_to_bound")
REFERENCE = "best_known"


def _ms(seconds: float) -> float:
  return 1e3 * seconds if math.isfinite(seconds) else float("inf")


def setting_gaps(problem: PlacementProblem, results, hw, workload,
                 bound: bool = True, timings: dict | None = None,
                 lp_max_cells: int = 0) -> dict[str, dict]:
  """``{method: {column of GAP_COLUMNS: value}}`` of one setting's placed methods.

  Args:
    problem: the profiling problem every method planned on.
    results: the :class:`~moe_edge.experiments.costing.MethodResult` list (evaluation reports).
    hw: the ``Hardware`` of the cost model.
    workload: the ``WorkloadSummary`` every method planned for.
    bound: also compute the lower bound and the gaps to it.
    timings: when given, ``timings["lower_bound"]`` receives the bound's seconds.
    lp_max_cells: the bound's facility-location LP size limit (``latency_lower_bound``).
  """
  batches = np.stack(workload_batches(workload))
  out, steps = {}, {}
  for r in results:
    if r.placement is None:
      continue
    dec, pre = r.reports["decode"].latency, r.reports["prefill"].latency
    st = LayerState.build(hw, problem.freq, batches, r.placement.hosts, r.placement.route)
    t = st.step_times()
    steps[r.method] = t
    out[r.method] = dict(
        request_ms=_ms(request_latency(dec, pre, workload).mean),
        planned_request_ms=_ms(request_latency(float(t[0]), float(t[1]), workload).mean),
        planned_decode_ms=1e3 * float(t[0]))
  if not out:
    return out
  ref = out.get(REFERENCE)
  lower = None
  try:
    best = min(steps, key=lambda m: out[m]["planned_request_ms"])
    if bound:
      t0 = time.perf_counter()
      lower = latency_lower_bound(problem, hw, workload, tuple(float(v) for v in steps[best]),
                                  lp_max_cells=lp_max_cells)
      if timings is not None:
        timings["lower_bound"] = time.perf_counter() - t0
  except PlacementError:  # the cluster cannot hold every expert once: no bound
    pass
  for row in out.values():
    if ref is not None:
      row["gap_to_best_known"] = row["planned_request_ms"] / ref["planned_request_ms"] - 1.0
    if lower is not None:
      lb, dec_b, _ = lower
      row["bound_request_ms"] = _ms(lb)
      row["bound_decode_ms"] = 1e3 * dec_b.step
      row["gap_to_bound"] = row["planned_request_ms"] / row["bound_request_ms"] - 1.0
      row["decode_gap_to_bound"] = row["planned_decode_ms"] / row["bound_decode_ms"] - 1.0
  return out


def _fmt(v, spec: str) -> str:
  if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, float) and math.isinf(v):
    return "inf"
  return format(v, spec)


def _pct(v) -> str:
  if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return f"{100 * v:+.2f}%".replace("+-", "-")


def format_gap_table(rows: Sequence[dict], model: str) -> str:
  """Markdown table of one model: request latency (evaluated and planned), decode step
  (planned), the gap to ``best_known`` and to the lower bound, per cluster and method."""
  mine = [r for r in rows if r["model"] == model and r.get("status") == "ok"
          and not r.get("extension") and "planned_request_ms" in r]
  lines = ["| cluster | method | request ms (evaluation) | request ms (planned) | "
           "gap to best_known | gap to lower bound | decode ms (planned) | "
           "decode gap to lower bound |", "|" + "---|" * 8]
  for r in mine:
    lines.append(f"| {r['cluster']} | {r['method']} | {_fmt(r.get('request_ms'), '.1f')} | "
                 f"{_fmt(r.get('planned_request_ms'), '.1f')} | "
                 f"{_pct(r.get('gap_to_best_known'))} | {_pct(r.get('gap_to_bound'))} | "
                 f"{_fmt(r.get('planned_decode_ms'), '.2f')} | "
                 f"{_pct(r.get('decode_gap_to_bound'))} |")
  for cluster in dict.fromkeys(r["cluster"] for r in mine):
    r = next(x for x in mine if x["cluster"] == cluster)
    if r.get("bound_request_ms") not in (None, ""):
      lines.append(f"| {cluster} | *lower bound* | - | {_fmt(r['bound_request_ms'], '.1f')} | "
                   f"- | - | {_fmt(r['bound_decode_ms'], '.2f')} | - |")
  return "\n".join(lines)


def _goal_setting(by: dict, model: str, cluster: str, ours: str, pool: Sequence[str], key: str,
                  planned_key: str, bound_key: str):
  """``(ratio, allowed)`` of one setting or None: ``ours``' ``key`` over the best of ``pool``'s,
  and the largest reduction the lower bound allows below the best planned value of ``pool``
  (``1 - bound / planned``; None without a bound)."""
  mine = by.get((model, cluster, ours))
  base = [by[(model, cluster, b)] for b in pool if (model, cluster, b) in by]
  if mine is None or not base or not all(_finite(b.get(key)) for b in base):
    return None
  if not _finite(mine.get(key)):
    return None
  best = min(base, key=lambda b: b[key])
  lb = mine.get(bound_key)
  bp = min(base, key=lambda b: b.get(planned_key, float("inf"))).get(planned_key)
  allowed = 1.0 - lb / bp if _finite(lb) and _finite(bp) and bp > 0 else None
  return mine[key] / best[key], allowed


def _by_setting(rows: Sequence[dict]) -> dict:
  return {(r["model"], r["cluster"], r["method"]): r for r in rows
          if r.get("status") == "ok" and not r.get("extension")}


def goal_summary(rows: Sequence[dict], ours: str, baselines: Sequence[str], target: float,
                 key: str, planned_key: str, bound_key: str,
                 against: str | None = None) -> dict:
  """``ours``' ``key`` against the best of ``baselines`` (or the method ``against``) per
  setting: geometric-mean reduction over every setting and over the settings the lower bound
  does not rule out for a reduction of ``target``.

  Returns ``{"all": (reduction, settings), "reachable": (reduction, settings),
  "unreachable": [setting labels], "bound": the largest geometric-mean reduction the lower
  bound allows over every setting (None unless every setting has a bound)}``: when ``bound``
  is below ``target`` no placement meets the mean goal under the cost model.
  """
  by = _by_setting(rows)
  ratios, reach, out_of, allow = [], [], [], []
  for model, cluster in dict.fromkeys((r["model"], r["cluster"]) for r in rows):
    got = _goal_setting(by, model, cluster, ours, [against] if against else baselines, key,
                        planned_key, bound_key)
    if got is None:
      continue
    ratio, allowed = got
    ratios.append(ratio)
    allow.append(allowed)
    if allowed is not None and allowed < target:
      out_of.append(f"{model}/{cluster}")
    else:
      reach.append(ratio)

  def red(x):
    return (float(1.0 - np.exp(np.log(x).mean())) if x else float("nan"), len(x))
  bound = (red([1.0 - a for a in allow])[0] if allow and all(a is not None and a < 1.0
                                                             for a in allow) else None)
  return {"all": red(ratios), "reachable": red(reach), "unreachable": out_of, "bound": bound}


GOALS = (("decode", "decode_ms", "planned_decode_ms", "bound_decode_ms"),
         ("request", "request_ms", "planned_request_ms", "bound_request_ms"))
TARGETS = ((0.2, None, "the best baseline"), (0.3, "prism", "prism"))


def format_goal_table(rows: Sequence[dict], ours: str, baselines: Sequence[str]) -> str:
  """Markdown table, one row per setting: ``ours``' decode and request latency against the best
  baseline (goal 20% below) and prism (30% below), each with the largest reduction the lower
  bound allows and "unreachable (bound)" where it is below the goal; and the gap of
  ``best_known`` to the bound (planned request latency and decode step)."""
  by = _by_setting(rows)
  targets = [t for t in TARGETS if not t[1] or any(r.get("method") == t[1] for r in rows)]
  head = [f"{g} vs {'best baseline' if a is None else a} (goal -{100 * t:.0f}%)"
          for g, *_ in GOALS for t, a, _ in targets]
  lines = ["| setting | " + " | ".join(head) + " | best_known gap to bound (request / decode) |",
           "|" + "---|" * (len(head) + 2)]
  for model, cluster in dict.fromkeys((r["model"], r["cluster"]) for r in rows):
    cells = []
    for _, key, planned, bound in GOALS:
      for target, against, _ in targets:
        got = _goal_setting(by, model, cluster, ours, [against] if against else baselines, key,
                            planned, bound)
        if got is None:
          cells.append("-")
          continue
        ratio, allowed = got
        cell = _pct(ratio - 1.0)
        if allowed is not None:
          cell += (f"; **unreachable (bound)**: at most -{100 * allowed:.1f}%"
                   if allowed < target else f"; bound allows -{100 * allowed:.1f}%")
        cells.append(cell)
    if all(c == "-" for c in cells):
      continue
    bk = by.get((model, cluster, REFERENCE), {})
    gap = (f"{_pct(bk.get('gap_to_bound'))} / {_pct(bk.get('decode_gap_to_bound'))}"
           if _finite(bk.get("gap_to_bound")) else "-")
    lines.append(f"| {model}/{cluster} | " + " | ".join(cells) + f" | {gap} |")
  return "\n".join(lines)


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _lower(x: float) -> str:
  """A reduction as text: 0.12 -> '12.0% lower', -0.05 -> '5.0% higher'."""
  return f"{100 * abs(x):.1f}% {'lower' if x >= 0 else 'higher'}"


def format_goals(rows: Sequence[dict], ours: str, baselines: Sequence[str]) -> str:
  """Issue 18's headline goals as Markdown list items: decode and request latency of ``ours``
  at least 20% below the best baseline and 30% below prism (geometric means, with and without
  the settings the lower bound shows unreachable)."""
  lines = []
  for label, (_, key, planned, bound) in zip(("decode latency per token", "request latency"),
                                             GOALS):
    for target, against, who in TARGETS:
      if against and not any(r.get("method") == against for r in rows):
        continue
      g = goal_summary(rows, ours, baselines, target, key, planned, bound, against)
      (a, n), (b, m) = g["all"], g["reachable"]
      if n == 0:
        continue
      if not g["unreachable"]:
        un = "; the lower bound rules out no setting"
      elif m == 0:
        un = f"; the lower bound rules out {100 * target:.0f}% in every setting"
      else:
        un = (f"; without the {len(g['unreachable'])} setting(s) whose lower bound rules out "
              f"{100 * target:.0f}% ({', '.join(g['unreachable'])}): {_lower(b)} over {m}")
      ok = "met" if a >= target else "missed"
      if g["bound"] is not None:
        un += (f"; the lower bound allows at most {_lower(g['bound'])} as a geometric mean over "
               f"all {n}" + (f", so **the goal is unreachable (bound)**"
                             if g["bound"] < target else ""))
      lines.append(f"- **{label}** (goal: {100 * target:.0f}% below {who}): {ours} is "
                   f"{_lower(a)} than {who} (geometric mean over {n} settings: {ok}){un}.")
  return "\n".join(lines)
