"""Robustness of the latency search: wins, ties and losses against the best baseline and prism
over seeds, locality ``alpha``, domain-to-server assignment families and clusters.

One *instance* = (cluster, home family, alpha, seed): a profiling and an evaluation trace of the
model's real routing statistics (``sample_stats_trace``, seeds ``seed + profile_offset`` and
``seed``) with the family's homes; every method planned on the profiling trace and costed on
the evaluation trace (``costing.cost_methods``, as the tables do) for the request workload
``request_rate`` requests/s per server. Per method two numbers: ``request_ms`` (mean request
latency of the evaluation trace's step times) and ``planned_request_ms`` (on the profiling
problem: what the search minimises; ``gaps.py``). ``latency_search`` against the best method of
role ``baseline`` (and against ``prism``) is a *win* below ``1 - tie``, a *tie* within ``tie``,
a *loss* above; the goal is never worse than ``1 + loss_limit`` times the best baseline.

Home families (``families``), ``N`` servers over the statistics' ``D`` domains:

* ``one_home``: server ``n`` lives at domain ``n mod D`` (round robin);
* ``swap``: one home per server, the round robin's homes reversed (the fastest servers get the
  homes the slowest had);
* ``mix``: server ``n`` draws its home requests half from domain ``n mod D``, half from domain
  ``(n + 1) mod D``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from moe_edge.config import ConfigError, cluster_config, model_config, with_expert_memory
from moe_edge.cost import CostModel
from moe_edge.experiments import calibration as calib
from moe_edge.experiments.costing import cost_methods, phase_traces, workload_summary
from moe_edge.experiments.gaps import setting_gaps
from moe_edge.placement import registry
from moe_edge.workload.stats_traces import STATS_MODELS, load_routing_stats, sample_stats_trace
from moe_edge.workload.streams import default_homes

FAMILIES = ("one_home", "swap", "mix")
OURS = "latency_search"


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
  """Settings of ``experiments/robustness.py`` (``configs/experiments/robustness.py``).

  Attributes:
    model: a model with routing statistics (``STATS_MODELS``).
    clusters: cluster presets (homogeneous and heterogeneous).
    families: home families (module docstring).
    alphas: locality values in [0, 1].
    seeds: trace seeds (the profiling trace uses ``seed + profile_offset``).
    tokens_per_server, request_len: size of each trace.
    link_gbps, copies, calibration, decode_batch: as in the tables.
    request_rate: requests/s per server; request_output_tokens: outputs per request.
    tie: relative difference counted as a tie; loss_limit: the goal's tolerance.
  """
  name: str = "robustness"
  model: str = "olmoe_1b_7b"
  clusters: tuple[str, ...] = ("homogeneous_4", "edge_hetero_4")
  families: tuple[str, ...] = FAMILIES
  alphas: tuple[float, ...] = (0.6, 0.8, 1.0)
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  profile_offset: int = 1000
  tokens_per_server: int = 2048
  request_len: int = 128
  link_gbps: float = 1.0
  copies: float = 1.5
  calibration: str = "h200_grouped"
  decode_batch: int = 8
  request_rate: float = 0.1
  request_output_tokens: int = 64
  tie: float = 1e-3
  loss_limit: float = 0.01

  def __post_init__(self):
    if self.model not in STATS_MODELS:
      raise ConfigError(f"robustness: model must have routing statistics ({STATS_MODELS}), "
                        f"got {self.model!r}.")
    bad = [f for f in self.families if f not in FAMILIES]
    if bad or not self.families:
      raise ConfigError(f"robustness: unknown home families {bad}; use some of {FAMILIES}.")
    if not self.clusters or not self.seeds or not self.alphas:
      raise ConfigError("robustness: clusters, seeds and alphas must each name at least one.")
    if any(not (0.0 <= a <= 1.0) for a in self.alphas):
      raise ConfigError(f"robustness: alphas must lie in [0, 1], got {self.alphas}.")
    for key in ("tokens_per_server", "request_len", "link_gbps", "copies", "decode_batch",
                "request_rate", "request_output_tokens"):
      if not getattr(self, key) > 0:
        raise ConfigError(f"robustness: {key} must be positive, got {getattr(self, key)!r}.")
    if not (self.tie >= 0 and self.loss_limit >= 0):
      raise ConfigError("robustness: tie and loss_limit must be >= 0.")


def family_homes(family: str, num_servers: int, domains: Sequence[str]) -> tuple:
  """The homes of ``family`` (module docstring) for ``num_servers`` servers."""
  base = default_homes(num_servers, domains)
  if family == "one_home":
    return base
  if family == "swap":
    return tuple(reversed(base))
  if family == "mix":
    d = len(domains)
    return tuple({domains[n % d]: 0.5, domains[(n + 1) % d]: 0.5} for n in range(num_servers))
  raise ConfigError(f"unknown home family {family!r}; use one of {FAMILIES}.")


def methods() -> tuple[str, ...]:
  """The compared methods: every baseline, prism and the latency search."""
  return tuple(registry.names("baseline")) + ("prism", OURS)


def instance_rows(cfg: RobustnessConfig, cluster_name: str, family: str, alpha: float,
                  seed: int) -> list[dict]:
  """One row per method of one instance (keys: the instance, method, request_ms,
  planned_request_ms, decode_ms, prefill_ms)."""
  model = model_config(cfg.model)
  cluster = with_expert_memory(cluster_config(cluster_name, link_gbps=cfg.link_gbps), model,
                               cfg.copies)
  n = cluster.num_servers
  homes = family_homes(family, n, load_routing_stats(cfg.model).domains)
  sample = lambda s: sample_stats_trace(cfg.model, n, cfg.tokens_per_server, alpha, s,  # noqa
                                        home_domains=homes, request_len=cfg.request_len)
  profile, trace = sample(seed + cfg.profile_offset), sample(seed)
  cal = calib.edge_calibration(cfg.calibration, cluster, cfg.model)
  requests = dict(request_rate=cfg.request_rate, output_tokens=cfg.request_output_tokens)
  problem, results = cost_methods(trace, model, cluster, methods(), decode_batch=cfg.decode_batch,
                                  seed=seed, calibration=cal, profile=profile,
                                  requests=requests)
  phases = phase_traces(trace, "both", cfg.decode_batch, 1)
  gaps = setting_gaps(problem, results, CostModel.build(model, cluster, cal).hardware,
                      workload_summary(problem, phases, cfg.decode_batch, **requests),
                      bound=False)
  rows = []
  for r in results:
    rows.append(dict(model=cfg.model, cluster=cluster_name, family=family, alpha=alpha,
                     seed=seed, method=r.method, decode_ms=1e3 * r.reports["decode"].latency,
                     prefill_ms=1e3 * r.reports["prefill"].latency,
                     request_ms=gaps[r.method]["request_ms"],
                     planned_request_ms=gaps[r.method]["planned_request_ms"],
                     seconds=r.seconds))
  return rows


def verdict(ratio: float, tie: float) -> str:
  """``win`` / ``tie`` / ``loss`` of a ratio ours / reference."""
  if not math.isfinite(ratio):
    return "loss"
  return "win" if ratio < 1.0 - tie else ("tie" if ratio <= 1.0 + tie else "loss")


def compare(rows: Sequence[dict], cfg: RobustnessConfig) -> list[dict]:
  """Per instance: latency_search against the best baseline and prism, evaluated and planned."""
  base = set(registry.names("baseline"))
  inst: dict[tuple, dict] = {}
  for r in rows:
    inst.setdefault((r["cluster"], r["family"], r["alpha"], r["seed"]), {})[r["method"]] = r
  out = []
  for (cluster, family, alpha, seed), by in inst.items():
    row = dict(model=cfg.model, cluster=cluster, family=family, alpha=alpha, seed=seed)
    for key, tag in (("request_ms", ""), ("planned_request_ms", "planned_")):
      b = min((m for m in by if m in base), key=lambda m: by[m][key])
      ours = by[OURS][key]
      row[f"{tag}best_baseline"] = b
      row[f"{tag}vs_best_baseline"] = ours / by[b][key] - 1.0
      row[f"{tag}verdict_best_baseline"] = verdict(ours / by[b][key], cfg.tie)
      row[f"{tag}vs_prism"] = ours / by["prism"][key] - 1.0
      row[f"{tag}verdict_prism"] = verdict(ours / by["prism"][key], cfg.tie)
    row["search_s"] = by[OURS]["seconds"]
    out.append(row)
  return out


def summary(comp: Sequence[dict], cfg: RobustnessConfig) -> list[str]:
  """Markdown lines: wins/ties/losses per reference and view, worst case, the goal."""
  lines = ["| view | against | wins | ties | losses | worst | goal (<= +"
           f"{100 * cfg.loss_limit:g}%) |", "|---|---|---|---|---|---|---|"]
  for tag, view in (("", "evaluation trace"), ("planned_", "planned (profiling problem)")):
    for ref in ("best_baseline", "prism"):
      v = [c[f"{tag}verdict_{ref}"] for c in comp]
      worst = max(c[f"{tag}vs_{ref}"] for c in comp)
      ok = "met" if worst <= cfg.loss_limit else "MISSED"
      lines.append(f"| {view} | {ref.replace('_', ' ')} | {v.count('win')} | "
                   f"{v.count('tie')} | {v.count('loss')} | {100 * worst:+.2f}% | {ok} |")
  groups = {}
  for c in comp:
    groups.setdefault((c["cluster"], c["family"]), []).append(c["vs_best_baseline"])
  lines += ["", "| cluster | family | instances | mean vs best baseline (evaluation) | worst |",
            "|---|---|---|---|---|"]
  for (cl, fam), v in groups.items():
    lines.append(f"| {cl} | {fam} | {len(v)} | {100 * float(np.mean(v)):+.2f}% | "
                 f"{100 * max(v):+.2f}% |")
  return lines
