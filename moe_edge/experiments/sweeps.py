"""The ablation sweeps: one knob varied at a time, every method costed as in the tables.

Each sweep returns rows ``{sweep, x, setting, model, cluster, method, decode_ms, prefill_ms,
cross_kb_per_token, coverage, objective, ...}`` (``x`` numeric, for plotting). Defaults come from
the :class:`~moe_edge.experiments.config.ExperimentConfig`: statistics-driven traces of
``sweep_models`` (profiling and evaluation traces with different seeds, as in the tables) on
``sweep_cluster`` at ``link_gbps`` with ``copies`` of expert memory.

* ``link_bandwidth``: every link at ``link_gbps_values`` Gbit/s, latency held at 0.5 ms.
* ``num_servers``: ``server_counts`` servers cycling the device types of ``edge_hetero_8``
  (RTX 4090, 3090, A4000, AGX Orin, 4080, 3080, A5000, Orin NX, 4090, ...) on a flat switched
  LAN (``link_gbps``, 0.5 ms); server ``i`` has home domain ``DOMAINS[i % 5]``.
* ``memory``: ``copies_values`` copies of expert memory (``inf``: every server holds every
  expert); ``x`` is the copies the cluster really holds (whole experts).
* ``alpha``: locality ``alpha_values`` (0.2 = no locality with five domains).
* ``parts``: the full method (``dancemoe_refined``) with one part off at a time
  (``entropy_budgets``, ``hetero_aware``, ``replicas``, ``exchange``, ``refine``; ``no_refine``
  is plain ``dancemoe``), on every cluster of ``clusters``; ``uniform_ep`` for reference.
* ``migration``: a drifting workload (the first model's statistics; servers 0 and 1 swap home
  domains at 1/3 of the run, servers 2 and 3 at 2/3) replayed in intervals by the one pipeline
  (:func:`moe_edge.migration.replay.replay`, no trigger); ``none`` keeps the DanceMoE placement
  planned on interval 0, ``incremental`` applies
  :func:`moe_edge.migration.incremental.plan_incremental` (at most ``migration_max_moves`` expert
  copies per interval) planned on the previous interval's statistics, ``full_replan`` re-runs
  DanceMoE from scratch on them (the upper reference, at many more copies).
* ``extensions``: importance-driven substitution and its drop control at every
  ``extension_thresholds`` value on ``small_moe`` (the only model with weights) on
  ``sweep_cluster``, DanceMoE placement: bytes saved, latency and next-token loss change
  (:func:`moe_edge.experiments.extension_rows.sweep_extensions`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from moe_edge.core.errors import MoeEdgeError
from moe_edge.config import ClusterConfig, ModelConfig, cluster_config, uniform_links
from moe_edge.config import with_expert_memory
from moe_edge.experiments import calibration as calib
from moe_edge.experiments.config import PARTS, SWEEPS, ExperimentConfig
from moe_edge.experiments.progress import Progress
from moe_edge.experiments.costing import (cost_methods, cost_placement, phase_traces,
                                          planning_context, report_metrics, workload_summary)
from moe_edge.experiments.extension_rows import sweep_extensions as _sweep_extensions
from moe_edge.experiments.workloads import served_model
from moe_edge.placement import registry
from moe_edge.migration.config import MigrationConfig
from moe_edge.migration.drift import drift_preset, drifting_trace
from moe_edge.migration.replay import replay
from moe_edge.placement.objective import objective
from moe_edge.workload.stats_traces import STATS_MODELS, sample_stats_trace

GBPS = 1e9 / 8
LAN_LATENCY = 5e-4
X_LABELS = dict(link_bandwidth="link bandwidth (Gbit/s, 0.5 ms latency)",
                num_servers="servers (edge_hetero_8 device types cycled)",
                memory="copies of the experts the cluster holds",
                alpha="locality alpha (share of requests from the home domain)",
                parts="DanceMoE variant", migration="trace step",
                extensions="gate threshold tau (small_moe, DanceMoE placement)")


class SweepError(MoeEdgeError):
  """A sweep was asked for something it cannot do."""


# --------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------
def cycled_cluster(num_servers: int, link_gbps: float = 1.0,
                   latency_s: float = LAN_LATENCY) -> ClusterConfig:
  """``num_servers`` servers cycling edge_hetero_8's device types, flat uniform links."""
  if num_servers < 1:
    raise SweepError(f"num_servers must be >= 1, got {num_servers}.")
  types = cluster_config("edge_hetero_8").servers
  servers = tuple(types[i % len(types)] for i in range(num_servers))
  bw, lat = uniform_links(num_servers, link_gbps * GBPS, latency_s)
  return ClusterConfig(name=f"edge_cycled_{num_servers}@{link_gbps:g}gbps", servers=servers,
                       bandwidth=bw, latency=lat,
                       source="edge_hetero_8 device types cycled, flat switched LAN")


def everything_everywhere(cluster: ClusterConfig, model: ModelConfig) -> ClusterConfig:
  """Copy of ``cluster`` where every server has room for every expert of ``model``."""
  need = model.n_moe_layers * model.n_experts * model.expert_bytes
  servers = tuple(dataclasses.replace(s, memory_bytes=float(model.dense_bytes + need +
                                                            0.5 * model.expert_bytes),
                                      reserved_bytes=0.0) for s in cluster.servers)
  return dataclasses.replace(cluster, servers=servers, name=f"{cluster.name}@all")


# --------------------------------------------------------------------------------------------
# One point
# --------------------------------------------------------------------------------------------
def _traces(cfg: ExperimentConfig, model_name: str, num_servers: int, alpha: float):
  sample = lambda seed: sample_stats_trace(  # noqa: E731
      model_name, num_servers, cfg.sweep_tokens_per_server, alpha, seed,
      request_len=cfg.request_len)
  return sample(cfg.seed + cfg.profile_seed_offset), sample(cfg.seed)


def _point(cfg: ExperimentConfig, sweep: str, x: float, setting: str, model_name: str,
           cluster: ClusterConfig, traces, methods=None, variants=None) -> list[dict]:
  """Rows of every method (or DanceMoE variant) at one point of a sweep."""
  model = served_model(cfg, model_name)
  profile, trace = traces
  cal = calib.edge_calibration(cfg.calibration, cluster, model_name)
  problem, results = cost_methods(trace, model, cluster, methods or (), decode_batch=
                                  cfg.decode_batch, prefill_requests=cfg.prefill_requests,
                                  seed=cfg.seed, calibration=cal, profile=profile,
                                  requests=dict(request_rate=cfg.request_rate,
                                                output_tokens=cfg.request_output_tokens))
  l, e = model.n_moe_layers, model.n_experts
  base = dict(sweep=sweep, x=float(x), setting=setting, model=model_name, cluster=cluster.name,
              servers=cluster.num_servers,
              capacity_copies=float(problem.capacity.sum()) / (l * e))
  rows = []
  for r in results:
    rows.append(dict(base, method=r.method, **report_metrics(r.reports),
                     objective=objective(problem, r.placement)))
  if variants:
    phases = phase_traces(trace, "both", cfg.decode_batch, cfg.prefill_requests)
    # The same planner inputs as the full method's row (costing.cost_methods).
    context = planning_context(problem, phases, cfg.decode_batch, cfg.seed, cal,
                               workload_summary(problem, phases, cfg.decode_batch,
                                                cfg.request_rate,
                                                output_tokens=cfg.request_output_tokens))
    for label, opts in variants:
      p = registry.place("dancemoe", problem, opts, context)
      rows.append(dict(base, method=label,
                       **report_metrics(cost_placement(p, phases, model, cluster, cal)),
                       objective=objective(problem, p)))
  return rows


def _stats_models(cfg: ExperimentConfig) -> tuple[str, ...]:
  bad = [m for m in cfg.sweep_models if m not in STATS_MODELS]
  if bad:
    raise SweepError(f"sweeps run on statistics-driven models {STATS_MODELS}; got {bad}.")
  return cfg.sweep_models


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------
def sweep_link_bandwidth(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  rows = []
  for m in _stats_models(cfg):
    base = cluster_config(cfg.sweep_cluster)
    traces = _traces(cfg, m, base.num_servers, cfg.alpha)
    for g in cfg.link_gbps_values:
      c = with_expert_memory(cluster_config(cfg.sweep_cluster, link_gbps=g,
                                            latency_s=LAN_LATENCY), served_model(cfg, m),
                             cfg.copies)
      rows += _point(cfg, "link_bandwidth", g, f"{g:g} Gbps", m, c, traces, cfg.sweep_methods)
      tick(f"link_bandwidth {m} {g:g} Gbps")
  return rows


def sweep_num_servers(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  rows = []
  for m in _stats_models(cfg):
    for n in cfg.server_counts:
      c = with_expert_memory(cycled_cluster(int(n), cfg.link_gbps), served_model(cfg, m),
                             cfg.copies)
      rows += _point(cfg, "num_servers", n, f"{n} servers", m, c,
                     _traces(cfg, m, int(n), cfg.alpha), cfg.sweep_methods)
      tick(f"num_servers {m} {n}")
  return rows


def sweep_memory(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  rows = []
  for m in _stats_models(cfg):
    model = served_model(cfg, m)
    base = cluster_config(cfg.sweep_cluster, link_gbps=cfg.link_gbps)
    traces = _traces(cfg, m, base.num_servers, cfg.alpha)
    for copies in cfg.copies_values:
      if math.isinf(copies):
        c, setting = everything_everywhere(base, model), "every expert everywhere"
      else:
        c, setting = with_expert_memory(base, model, copies), f"{copies:g} copies"
      cap = c.expert_capacity(model)
      le = model.n_moe_layers * model.n_experts
      x = float(np.minimum(cap, le).sum()) / le
      rows += _point(cfg, "memory", x, setting, m, c, traces, cfg.sweep_methods)
      tick(f"memory {m} {setting}")
  return rows


def sweep_alpha(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  rows = []
  for m in _stats_models(cfg):
    base = cluster_config(cfg.sweep_cluster, link_gbps=cfg.link_gbps)
    c = with_expert_memory(base, served_model(cfg, m), cfg.copies)
    for a in cfg.alpha_values:
      rows += _point(cfg, "alpha", a, f"alpha {a:g}", m, c,
                     _traces(cfg, m, base.num_servers, a), cfg.sweep_methods)
      tick(f"alpha {m} {a:g}")
  return rows


def sweep_parts(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  # The full method is dancemoe_refined; "no_refine" is plain dancemoe.
  variants = [(f"no_{p}", {p: False, "refine": p != "refine"}) for p in PARTS]
  rows = []
  for m in _stats_models(cfg):
    for cl in cfg.clusters:
      base = cluster_config(cl, link_gbps=cfg.link_gbps)
      c = with_expert_memory(base, served_model(cfg, m), cfg.copies)
      rows += _point(cfg, "parts", 0, cl, m, c, _traces(cfg, m, base.num_servers, cfg.alpha),
                     ("dancemoe_refined", "uniform_ep"), variants)
      tick(f"parts {m} {cl}")
  return rows


def sweep_migration(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  """Per interval and policy: latency, coverage, bytes and the migration (expert copies, GB,
  transfer time) applied at the interval's start. The replay is the one pipeline of
  :func:`moe_edge.migration.replay.replay` (no trigger: the incremental plan of every interval
  is applied), costed here like the tables (decode and prefill phases, calibrated)."""
  m = _stats_models(cfg)[0]
  model = served_model(cfg, m)
  base = cluster_config(cfg.sweep_cluster, link_gbps=cfg.link_gbps)
  cluster = with_expert_memory(base, model, cfg.copies)
  cap = cluster.expert_capacity(model)
  w, steps = cfg.migration_interval, cfg.migration_steps
  drift = drift_preset("pairs", cluster.num_servers, steps, w)
  trace = drifting_trace(m, cluster.num_servers, steps, cfg.migration_request_len, cfg.alpha,
                         cfg.seed, drift)
  cal = calib.edge_calibration(cfg.calibration, cluster, m)
  mcfg = MigrationConfig(interval=w, policies=("none", "incremental", "full_replan"),
                         seed=cfg.seed, max_moves=cfg.migration_max_moves, trigger=False)
  rep = replay(trace, model, cluster, cap, mcfg)
  shifts = [s for s, _ in drift.changes]
  rows = []
  for i, win in enumerate(rep.windows):
    phases = phase_traces(win, "both", cfg.decode_batch, cfg.prefill_requests)
    for policy in mcfg.policies:
      st = rep.history[policy][i]
      rows.append(dict(sweep="migration", x=float(i * w), setting=f"interval {i}", model=m,
                       cluster=cluster.name, servers=cluster.num_servers, method=policy,
                       interval=i, **report_metrics(cost_placement(st.placement, phases, model,
                                                                   cluster, cal)),
                       moves=int(st.moves), gb_moved=st.moves * model.expert_bytes / 1e9,
                       transfer_s=float(st.transfer_s),
                       drift_after=";".join(str(s) for s in shifts)))
    tick(f"migration interval {i}")
  return rows


def sweep_extensions(cfg: ExperimentConfig, tick: Callable[[str], None]) -> list[dict]:
  """Substitution and drop over ``extension_thresholds`` (``extension_rows.py``)."""
  return _sweep_extensions(cfg, tick)


SWEEP_FUNCTIONS = dict(link_bandwidth=sweep_link_bandwidth, num_servers=sweep_num_servers,
                       memory=sweep_memory, alpha=sweep_alpha, parts=sweep_parts,
                       migration=sweep_migration, extensions=sweep_extensions)
assert tuple(SWEEP_FUNCTIONS) == SWEEPS


def sweep_units(cfg: ExperimentConfig, name: str) -> int:
  """Progress units of a sweep (one per point)."""
  k = len(cfg.sweep_models)
  return dict(link_bandwidth=k * len(cfg.link_gbps_values),
              num_servers=k * len(cfg.server_counts), memory=k * len(cfg.copies_values),
              alpha=k * len(cfg.alpha_values), parts=k * len(cfg.clusters),
              migration=-(-cfg.migration_steps // cfg.migration_interval),
              extensions=len(cfg.extension_thresholds))[name]


def run_sweep(cfg: ExperimentConfig, name: str, progress: Progress | None = None) -> list[dict]:
  """Rows of sweep ``name`` (one of :data:`SWEEPS`)."""
  if name not in SWEEP_FUNCTIONS:
    raise SweepError(f"unknown sweep {name!r}; known: {', '.join(SWEEPS)}.")
  tick = (lambda what: progress.update(what)) if progress is not None else (lambda what: None)
  return SWEEP_FUNCTIONS[name](cfg, tick)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def format_sweep(rows: list[dict], name: str, key: str = "decode_ms", spec: str = ".2f") -> str:
  """Markdown pivot: per model, one row per sweep point, one column per method."""
  out = []
  for m in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == m]
    methods = list(dict.fromkeys(r["method"] for r in mine))
    points = list(dict.fromkeys((r["setting"], r["cluster"]) for r in mine))
    out += [f"{m}, {key}:", "", "| setting | " + " | ".join(methods) + " |",
            "|" + "---|" * (len(methods) + 1)]
    for setting, cl in points:
      vals = {r["method"]: r[key] for r in mine if (r["setting"], r["cluster"]) == (setting, cl)}
      best = min(vals.values())
      cells = [(f"**{v:{spec}}**" if v == best else f"{v:{spec}}") if (v := vals.get(x)) is not
               None else "-" for x in methods]
      label = setting if name != "parts" else cl
      out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def migration_summary(rows: list[dict]) -> list[dict]:
  """Per policy: means over the intervals after the first, and the total copies / GB / seconds."""
  out = []
  for policy in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == policy and r["interval"] > 0]
    out.append(dict(policy=policy, intervals=len(mine),
                    decode_ms=float(np.mean([r["decode_ms"] for r in mine])),
                    prefill_ms=float(np.mean([r["prefill_ms"] for r in mine])),
                    coverage=float(np.mean([r["coverage"] for r in mine])),
                    cross_kb_per_token=float(np.mean([r["cross_kb_per_token"] for r in mine])),
                    moves=int(sum(r["moves"] for r in mine)),
                    gb_moved=float(sum(r["gb_moved"] for r in mine)),
                    transfer_s=float(sum(r["transfer_s"] for r in mine))))
  return out
