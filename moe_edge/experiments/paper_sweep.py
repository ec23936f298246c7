r"""The paper experiment's ablation: one workload knob at a time, on the calibrated testbed.

The table's workloads are fixed (``paper_config.py``); here, for each ``sweep_settings`` entry
``"model:workload"``, one knob of that workload is varied while the others keep their configured
values: the locality ``alpha`` (``sweep_alphas``), the prompt length range
(``sweep_prompt_tokens``, ``(lo, hi)`` pairs) and the output length (``sweep_output_tokens``).
Every variant is planned afresh (its own pilot, its own expected problem: both depend on the
knob) and served by ``sweep_methods`` on ``sweep_duration_s`` seconds of arrivals.

Speed: the testbed's times are scaled by the factor that gives ``eplb_hetero`` the paper's EPLB
latency on the configured workload (fitted here as in :mod:`moe_edge.experiments.paper_calibrated`,
on the profiling requests), so each variant is read at the paper's operating point; a setting
the paper does not report runs at scale 1.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from moe_edge.experiments import paper_report as rep
from moe_edge.experiments.paper_calibrated import fit_to_paper, mean_latency
from moe_edge.experiments.paper_config import PaperConfig, sweep_setting
from moe_edge.experiments.paper_table import plan_setting
from moe_edge.experiments.paper_workload import workload_requests
from moe_edge.placement import registry

SWEEP_COLUMNS = ("model", "workload", "knob", "value", "alpha", "prompt_lo", "prompt_hi",
                 "output_tokens", "time_scale", "method", "mean_latency_s", "busy_fraction",
                 "vs_eplb_hetero")


def variants(cfg: PaperConfig, workload: str) -> Iterator[tuple[str, str, PaperConfig]]:
  """``(knob, value, config)`` of every variant: the configured workload first (knob ``base``),
  then each knob value that differs from the configured one."""
  spec = cfg.workload(workload)
  yield "base", "configured", cfg

  def with_spec(**kw):
    new = dataclasses.replace(spec, **kw)
    return dataclasses.replace(cfg, workloads=tuple(new if w.name == workload else w
                                                    for w in cfg.workloads))
  for a in cfg.sweep_alphas:
    if a != spec.alpha:
      yield "alpha", f"{a:g}", with_spec(alpha=float(a))
  for lo, hi in cfg.sweep_prompt_tokens:
    if (lo, hi) != tuple(cfg.prompt_tokens):
      yield "prompt_tokens", f"{lo}-{hi}", dataclasses.replace(cfg, prompt_tokens=(lo, hi))
  for t in cfg.sweep_output_tokens:
    if t != cfg.output_tokens:
      yield "output_tokens", f"{t}", dataclasses.replace(cfg, output_tokens=int(t))


def run_sweep(cfg: PaperConfig, seed: int | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
  """Rows of :data:`SWEEP_COLUMNS` for every setting, variant and method (module docstring)."""
  seed = cfg.seed if seed is None else seed
  short = dataclasses.replace(cfg, duration_s=cfg.sweep_duration_s,
                              profile_duration_s=cfg.sweep_duration_s)
  rows = []
  for entry in cfg.sweep_settings:
    model, workload = sweep_setting(entry)
    paper = rep.PAPER_LATENCY.get((model, workload))
    for knob, value, var in variants(short, workload):
      planned = plan_setting(var, model, workload, seed)
      if knob == "base":  # the first variant: the configured workload the scale is fitted on
        scale = fit_to_paper(var, planned, paper[0], seed)[0] if paper else 1.0
        log(f"  {model} {workload}: time scale {scale:.3g}")
      spec = planned.setting.workload
      req = workload_requests(var, spec, planned.setting.cluster.num_servers, var.duration_s,
                              seed)
      out = {}
      for m in cfg.sweep_methods:
        placement = registry.place(m, planned.problem, context=planned.context)
        out[m] = mean_latency(var, planned, placement, req, seed, scale)
      for m, (lat, busy) in out.items():
        rows.append(dict(model=model, workload=workload, knob=knob, value=value,
                         alpha=spec.alpha, prompt_lo=var.prompt_tokens[0],
                         prompt_hi=var.prompt_tokens[1], output_tokens=var.output_tokens,
                         time_scale=scale, method=m, mean_latency_s=lat, busy_fraction=busy,
                         vs_eplb_hetero=rep.change(lat, out[rep.BASELINE][0])))
      log(f"    {knob}={value}: prism vs eplb_hetero "
          f"{rep._pct(rep.change(out[rep.PAPER_METHOD][0], out[rep.BASELINE][0]))}")
  return rows


def format_sweep(rows: list[dict]) -> str:
  """A Markdown table: one row per setting and variant, each method's mean latency and ratio."""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  head = ["setting", "knob", "value", "time scale"] + [f"{m} s" for m in methods] + [
      f"{m} vs eplb_hetero" for m in methods if m != rep.BASELINE]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  keys = dict.fromkeys((r["model"], r["workload"], r["knob"], r["value"]) for r in rows)
  for key in keys:
    sel = {r["method"]: r for r in rows if (r["model"], r["workload"], r["knob"],
                                            r["value"]) == key}
    first = next(iter(sel.values()))
    cells = [f"{key[0]} {key[1]}", key[2], str(key[3]), f"{first['time_scale']:.3g}"]
    cells += [f"{sel[m]['mean_latency_s']:.2f}" for m in methods]
    cells += [rep._pct(sel[m]["vs_eplb_hetero"]) for m in methods if m != rep.BASELINE]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
