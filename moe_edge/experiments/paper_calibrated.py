r"""The paper experiment on a testbed calibrated to the paper's baseline: one time scale per setting.

Our testbed's step times are modelled (datasheet rates x calibration), not measured on the
paper's A100s, MoE-Infinity and tc-shaped network; at the configured load that model puts the
cluster near saturation, where mean latency grows as ``1 / (1 - utilisation)`` and ratios between
placements are amplified (``results/paper/README.md``). This part asks instead: **if our testbed
were exactly as fast as the paper's on its baseline, what would the paper's method gain?**

Per (model, workload) setting, with the table's placements (planned at scale 1):

1. **fit** ``s``: every modelled time (:meth:`moe_edge.core.hardware.Hardware.time_scaled`) is
   multiplied by ``s`` so that ``eplb_hetero``'s simulated mean request latency on the
   *profiling* requests (another seed) equals the paper's EPLB latency of that setting
   (``PAPER_LATENCY``). The mean latency rises with ``s`` (every service time scales by ``s``,
   arrivals stay), so ``s`` is found by bisection in ``log s`` (a diverging queue counts as too
   slow); the fit uses no number of the method under test;
2. **serve** every method's placement on the *evaluation* requests under the fitted ``s`` and
   report the ratios, next to the paper's.

The workloads stay as configured (fixed before the first run). ``s`` is a statement about the
paper's testbed relative to our model; very different ``s`` across settings of one model say
that the settings' workloads differ from ours by more than a speed (e.g. shorter requests).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from moe_edge.cost.model import CostModel
from moe_edge.experiments import paper_report as rep
from moe_edge.experiments.paper_config import PaperConfig
from moe_edge.experiments.paper_table import (PROFILE_SEED_OFFSET, Planned, mean_and_busy,
                                              plan_setting)
from moe_edge.experiments.paper_workload import workload_requests
from moe_edge.placement import registry
from moe_edge.workload.requests import Requests

CALIBRATED_COLUMNS = ("model", "workload", "method", "time_scale", "paper_eplb_s",
                      "fit_eplb_s", "mean_latency_s", "busy_fraction")


def scaled(cost: CostModel, factor: float) -> CostModel:
  """``cost`` with every modelled time ``factor`` times as long."""
  return dataclasses.replace(cost, hardware=cost.hardware.time_scaled(factor))


def mean_latency(cfg: PaperConfig, planned: Planned, placement, requests: Requests, seed: int,
                 factor: float) -> tuple[float, float]:
  """``(mean request latency s, busy fraction)`` of ``placement`` on ``requests`` with times
  scaled by ``factor``; ``(inf, 1.0)`` when the queue diverges."""
  return mean_and_busy(cfg, planned.setting, scaled(planned.cost, factor), placement, requests,
                       seed)


def fit_time_scale(latency_at: Callable[[float], float], target_s: float, lo: float = 1e-3,
                   hi: float = 10.0, rel_tol: float = 5e-3, max_iter: int = 40
                   ) -> tuple[float, float]:
  """``(s, latency_at(s))`` with ``latency_at(s)`` within ``rel_tol`` of ``target_s``, by
  bisection in ``log s`` over ``[lo, hi]`` for a nondecreasing ``latency_at`` (the last
  midpoint after ``max_iter`` halvings otherwise). ValueError when ``target_s`` lies outside
  ``[latency_at(lo), latency_at(hi)]`` (the bracket names the fix)."""
  if not (math.isfinite(target_s) and target_s > 0):
    raise ValueError(f"target latency must be a positive number of seconds, got {target_s!r}.")
  f_lo, f_hi = latency_at(lo), latency_at(hi)
  if not f_lo <= target_s <= f_hi:
    raise ValueError(f"target {target_s:g} s is outside [{f_lo:g}, {f_hi:g}] s reached with "
                     f"time scales [{lo:g}, {hi:g}]; widen the bracket.")
  a, b, mid, f_mid = math.log(lo), math.log(hi), lo, f_lo
  for _ in range(max_iter):
    mid = math.exp(0.5 * (a + b))
    f_mid = latency_at(mid)
    if abs(f_mid - target_s) <= rel_tol * target_s:
      break
    if f_mid < target_s:
      a = math.log(mid)
    else:
      b = math.log(mid)
  return mid, f_mid


def fit_to_paper(cfg: PaperConfig, planned: Planned, target_s: float, seed: int,
                 baseline=None) -> tuple[float, float]:
  """Step 1 of the module docstring: ``(s, eplb_hetero's mean latency at s)`` on the profiling
  requests (seed ``seed + PROFILE_SEED_OFFSET``); ``baseline``: eplb_hetero's placement when
  already made."""
  if baseline is None:
    baseline = registry.place(rep.BASELINE, planned.problem, context=planned.context)
  profile = workload_requests(cfg, planned.setting.workload, planned.setting.cluster.num_servers,
                              cfg.profile_duration_s, seed + PROFILE_SEED_OFFSET)
  return fit_time_scale(lambda f: mean_latency(cfg, planned, baseline, profile,
                                               seed + PROFILE_SEED_OFFSET, f)[0], target_s)


def run_calibrated_setting(cfg: PaperConfig, model: str, workload: str, methods: Sequence[str],
                           seed: int) -> list[dict]:
  """The rows of one setting (module docstring): the fitted scale, then every method."""
  paper = rep.PAPER_LATENCY.get((model, workload))
  if paper is None:
    return []
  planned = plan_setting(cfg, model, workload, seed)
  evaluation = workload_requests(cfg, planned.setting.workload,
                                 planned.setting.cluster.num_servers, cfg.duration_s, seed)
  place = {m: registry.place(m, planned.problem, context=planned.context) for m in methods}
  s, fit = fit_to_paper(cfg, planned, paper[0], seed, place[rep.BASELINE])
  rows = []
  for m in methods:
    lat, busy = mean_latency(cfg, planned, place[m], evaluation, seed, s)
    rows.append(dict(model=model, workload=workload, method=m, time_scale=s,
                     paper_eplb_s=paper[0], fit_eplb_s=fit, mean_latency_s=lat,
                     busy_fraction=busy))
  return rows


def run_calibrated(cfg: PaperConfig, seed: int | None = None,
                   log: Callable[[str], None] = print) -> list[dict]:
  """:func:`run_calibrated_setting` for every (model, workload) of the table the paper reports."""
  seed = cfg.seed if seed is None else seed
  ours = registry.names("ours") if cfg.include_ours else []
  methods = list(dict.fromkeys(list(cfg.calibrated_methods) + ours))
  rows = []
  for model in cfg.models:
    for workload in cfg.table_workloads:
      r = run_calibrated_setting(cfg, model, workload, methods, seed)
      if r:
        log(f"  {model} {workload}: time scale {r[0]['time_scale']:.3g} "
            f"(eplb_hetero {r[0]['fit_eplb_s']:.2f} s on the profiling requests)")
      rows += r
  return rows


def comparison(rows: Sequence[dict]) -> list[dict]:
  """Per setting: the fitted scale, prism and our best against eplb_hetero, beside the paper."""
  out = []
  for model, workload in dict.fromkeys((r["model"], r["workload"]) for r in rows):
    sel = {r["method"]: r for r in rows if (r["model"], r["workload"]) == (model, workload)}
    eplb, prism = sel[rep.BASELINE]["mean_latency_s"], sel[rep.PAPER_METHOD]["mean_latency_s"]
    ours = [r for m, r in sel.items() if registry.role(m) == "ours"
            and np.isfinite(r["mean_latency_s"])]
    best = min(ours, key=lambda r: r["mean_latency_s"]) if ours else None
    paper = rep.PAPER_LATENCY[(model, workload)]
    out.append(dict(model=model, workload=workload, time_scale=sel[rep.BASELINE]["time_scale"],
                    eplb_s=eplb, prism_s=prism, prism_change=rep.change(prism, eplb),
                    paper_change=rep.change(paper[1], paper[0]),
                    best=best["method"] if best else "", best_s=best["mean_latency_s"]
                    if best else math.nan,
                    best_vs_prism=rep.change(best["mean_latency_s"], prism) if best else math.nan,
                    busy_eplb=sel[rep.BASELINE]["busy_fraction"],
                    busy_prism=sel[rep.PAPER_METHOD]["busy_fraction"]))
  return out


def ratios(rows: Sequence[dict] | None) -> dict:
  """``{(model, workload): (time scale, prism vs eplb_hetero)}``: what the goals judge."""
  return {(c["model"], c["workload"]): (c["time_scale"], c["prism_change"])
          for c in comparison(rows or [])}
