"""The paper's experiment: every method served on the testbed workloads, the workload shift
under three migration policies, and the scaling sweep; request-level latency from the
simulator (:mod:`moe_edge.serving.simulator`).

Per (model, workload) setting (:func:`run_setting`):

1. the testbed cluster and the routing statistics (:mod:`moe_edge.experiments.paper_workload`);
2. a *pilot*: the profiling workload (another seed) served under ``pilot_method`` (``prism``)
   measures what the
   scheduler forms, the deployment's :class:`~moe_edge.placement.registry.WorkloadSummary`
   (mean decode batch and prefill tokens per server and step) and the tokens per step every
   method's problem is scaled by;
3. every method places experts on the expected problem (with the cost model and the summary in
   its :class:`~moe_edge.placement.registry.PlacementContext`) and serves the same evaluation
   requests; a method whose queue diverges gets ``inf`` latency and a note. The context also
   carries a judge, a simulation on the pilot's profiling requests (:func:`profile_latency`),
   with which ``latency_search`` makes its final choice among its result and its starts.

The shift (:func:`run_shift`) serves ``shift_from`` then ``shift_to`` from one initial
placement (``shift_method`` planned on ``shift_from``) under the policies ``none``, ``paper``
and ``ours`` (:mod:`moe_edge.experiments.paper_shift`). The scaling sweep
(:func:`run_scaling`) repeats the 1-1-2 testbed up to 256 GPUs at several link speeds.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import numpy as np

from moe_edge.config import ConfigError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost.model import CostModel
from moe_edge.experiments.calibration import edge_calibration
from moe_edge.experiments.paper_config import PaperConfig
from moe_edge.experiments.paper_workload import Setting, build_setting, workload_requests
from moe_edge.placement import registry
from moe_edge.placement.registry import PlacementContext, WorkloadSummary
from moe_edge.serving.scheduler import SchedulerOptions
from moe_edge.serving.simulator import QueueDivergesError, SampledRouting, SimResult, simulate
from moe_edge.workload.requests import Requests

PROFILE_SEED_OFFSET = 1000
PATTERN_SERVERS = (1, 1, 2)  # GPUs of the testbed's servers: 3 servers per 4 GPUs


def table_methods(cfg: PaperConfig) -> list[str]:
  """The table's rows: ``cfg.methods`` plus every registered ``ours`` method (registry order).
  ConfigError naming the registered methods when one is unknown."""
  known = registry.names()
  bad = [m for m in cfg.methods if m not in known]
  if bad:
    raise ConfigError(f"paper experiment {cfg.name!r}: methods {bad} are not registered; "
                      f"registered: {', '.join(known)}.")
  ours = registry.names("ours") if cfg.include_ours else []
  return list(dict.fromkeys(list(cfg.methods) + ours))


def scheduler_options(cfg: PaperConfig) -> SchedulerOptions:
  s = cfg.scheduler
  return SchedulerOptions(max_batch=s.max_batch, token_budget=s.token_budget,
                          prefill_chunk=s.prefill_chunk, policy=s.policy)


def cost_model(cfg: PaperConfig, setting: Setting) -> CostModel:
  cal = edge_calibration(cfg.calibration, setting.cluster, setting.model.name)
  return CostModel.build(setting.model, setting.cluster, cal)


def serve(cfg: PaperConfig, setting: Setting, cost: CostModel, placement: Placement,
          requests: Requests, seed: int, pool: int = 0, **kwargs) -> SimResult:
  """Simulate ``requests`` on ``placement`` (the config's scheduler and divergence limit, the
  KV budgets the placement leaves, attention priced, routing sampled from the setting's
  statistics; ``pool``: :class:`~moe_edge.serving.simulator.SampledRouting`)."""
  routing = SampledRouting(setting.stats, requests.domain, seed, pool)
  return simulate(requests, placement, cost, scheduler_options(cfg), routing,
                  max_waiting=cfg.max_waiting, kv_tokens="placement", **kwargs)


def measured_summary(result: SimResult, cfg: PaperConfig, spec_rate: float,
                     num_servers: int) -> tuple[WorkloadSummary, np.ndarray]:
  """``(summary, tokens per step [N])`` of a served run: mean decode tokens over steps where a
  server decodes, mean prefill tokens over steps where it prefills, mean tokens per step."""
  pre = np.array([s.prefill_tokens for s in result.steps], dtype=np.float64)   # [S, N]
  dec = np.array([s.decode_tokens for s in result.steps], dtype=np.float64)
  def mean_pos(a):
    return np.array([a[a[:, n] > 0, n].mean() if np.any(a[:, n] > 0) else 1.0
                     for n in range(num_servers)])
  prompt = 0.5 * (cfg.prompt_tokens[0] + cfg.prompt_tokens[1])
  summary = WorkloadSummary(request_rate=np.full(num_servers, spec_rate),
                            prompt_tokens=np.full(num_servers, prompt),
                            output_tokens=np.full(num_servers, float(cfg.output_tokens)),
                            decode_batch=mean_pos(dec), prefill_tokens=mean_pos(pre))
  return summary, (pre + dec).mean(axis=0)


@dataclasses.dataclass(frozen=True)
class Planned:
  """A setting made ready to place on: its cost model, the pilot-scaled problem and the
  context every method receives."""
  setting: Setting
  cost: CostModel
  problem: PlacementProblem
  context: PlacementContext


def mean_and_busy(cfg: PaperConfig, setting: Setting, cost: CostModel, placement: Placement,
                  requests: Requests, seed: int, pool: int = 0) -> tuple[float, float]:
  """``(mean request latency s, busy fraction)`` of ``placement`` serving ``requests``
  (:func:`serve`); ``(inf, 1.0)`` when its queue diverges."""
  try:
    res = serve(cfg, setting, cost, placement, requests, seed, pool=pool)
  except QueueDivergesError:
    return math.inf, 1.0
  return float(res.latencies().mean()), float(res.busy_fraction)


def profile_latency(cfg: PaperConfig, setting: Setting, cost: CostModel, requests: Requests,
                    seed: int, pool: int, placement: Placement) -> float:
  """Mean request latency (s) of ``placement`` serving the profiling ``requests`` (``inf`` when
  its queue diverges): the judge of :class:`PlacementContext` (``placement/judged.py``)."""
  return mean_and_busy(cfg, setting, cost, placement, requests, seed, pool)[0]


def plan_setting(cfg: PaperConfig, model: str, workload: str, seed: int, num_gpus: int = 4,
                 link_mbps: float | None = None, pool: int = 0, judge: bool = False) -> Planned:
  """Steps 1-2 of the module docstring (``pool``: the pilot's routing sampler, see
  :class:`~moe_edge.serving.simulator.SampledRouting`). ``judge``: the context also carries
  :func:`profile_latency` on the pilot's profiling requests (seed ``seed +
  PROFILE_SEED_OFFSET``, never the evaluation's), so ``latency_search`` ends with a simulated
  choice among its result and its starts."""
  setting = build_setting(cfg, model, workload, num_gpus, link_mbps)
  cost = cost_model(cfg, setting)
  n = setting.cluster.num_servers
  problem = PlacementProblem.build(setting.model, setting.cluster, setting.problem.freq,
                                   setting.problem.tokens, calibration=cost.calibration)
  pilot_ctx = PlacementContext(seed=seed, cost=cost)
  pilot_req = workload_requests(cfg, setting.workload, n, cfg.profile_duration_s,
                                seed + PROFILE_SEED_OFFSET)
  pilot = serve(cfg, setting, cost, registry.place(cfg.pilot_method, problem, context=pilot_ctx),
                pilot_req, seed + PROFILE_SEED_OFFSET, pool=pool)
  summary, per_step = measured_summary(pilot, cfg, 1.0 / setting.workload.interarrival_s, n)
  problem = PlacementProblem.build(setting.model, setting.cluster, setting.problem.freq,
                                   per_step, calibration=cost.calibration)
  judge_fn = functools.partial(profile_latency, cfg, setting, cost, pilot_req,
                               seed + PROFILE_SEED_OFFSET, pool) if judge else None
  return Planned(setting, cost, problem, PlacementContext(seed=seed, cost=cost,
                                                          workload=summary, judge=judge_fn))


def result_row(planned: Planned, method: str, result: SimResult | None,
               error: str = "") -> dict:
  """One row of ``table.csv`` (``gap_to_best_known`` is filled per setting afterwards)."""
  s = planned.setting
  row = dict(model=s.model.name, workload=s.workload.name, method=method,
             role=registry.role(method),
             note=error or (s.stats_note if "stand-in" in s.stats_note else ""))
  if result is None:
    return dict(row, mean_latency_s=math.inf, p50_latency_s=math.inf, p99_latency_s=math.inf,
                ttft_s=math.inf, tpot_s=math.inf, cross_kb_per_token=math.nan,
                coverage=math.nan, requests=0, busy_fraction=math.nan)
  lat = result.latencies()
  ttft = np.array([r.first_token_s - r.arrival_s for r in result.requests])
  multi = [r for r in result.requests if r.output_tokens > 1]
  tpot = np.array([(r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in multi])
  return dict(row, mean_latency_s=float(lat.mean()), p50_latency_s=float(np.percentile(lat, 50)),
              p99_latency_s=float(np.percentile(lat, 99)), ttft_s=float(ttft.mean()),
              tpot_s=float(tpot.mean()) if tpot.size else math.nan,
              cross_kb_per_token=result.cross_bytes / max(result.tokens_fed, 1) / 1e3,
              coverage=result.coverage, requests=len(result.requests),
              busy_fraction=result.busy_fraction)


LIGHT_LOAD_METHODS = ("prism", "eplb_hetero")


def run_setting(cfg: PaperConfig, model: str, workload: str, methods: list[str], seed: int,
                on_method: Callable[[str], None] | None = None
                ) -> tuple[list[dict], dict[str, np.ndarray], dict[str, float]]:
  """Rows, per-request latencies ``{method: [R] s}`` and the light-load diagnostic of one
  setting (module docstring): ``{method: mean latency}`` of :data:`LIGHT_LOAD_METHODS` with the
  same placements and arrivals ``light_load_factor`` times sparser (what the ratio is without
  the queueing of the configured load)."""
  planned = plan_setting(cfg, model, workload, seed, judge=True)
  s = planned.setting
  n = s.cluster.num_servers
  requests = workload_requests(cfg, s.workload, n, cfg.duration_s, seed)
  light_spec = dataclasses.replace(s.workload, interarrival_s=s.workload.interarrival_s
                                   * cfg.light_load_factor)
  light_req = workload_requests(cfg, light_spec, n, cfg.duration_s * cfg.light_load_factor,
                                seed)
  rows, lat, light = [], {}, {}
  for m in methods:
    placement = registry.place(m, planned.problem, context=planned.context)
    try:
      res = serve(cfg, s, planned.cost, placement, requests, seed)
    except QueueDivergesError as e:
      rows.append(result_row(planned, m, None, f"queue diverges: {e}"))
    else:
      rows.append(result_row(planned, m, res))
      lat[m] = res.latencies()
    if m in LIGHT_LOAD_METHODS:
      light[m] = float(serve(cfg, s, planned.cost, placement, light_req, seed).latencies().mean())
    if on_method is not None:
      on_method(m)
  return rows, lat, light


def run_table(cfg: PaperConfig, seed: int | None = None, log: Callable[[str], None] = print
              ) -> tuple[list[dict], dict, dict]:
  """Every (model, workload) setting of the config: rows, latencies and light-load means per
  setting."""
  seed = cfg.seed if seed is None else seed
  methods = table_methods(cfg)
  rows, lat, light = [], {}, {}
  for model in cfg.models:
    for workload in cfg.table_workloads:
      t0 = time.perf_counter()
      r, l, g = run_setting(cfg, model, workload, methods, seed)
      rows += r
      lat[(model, workload)] = l
      light[(model, workload)] = g
      log(f"  {model} {workload}: {len(methods)} methods ({time.perf_counter() - t0:.0f} s)")
  return rows, lat, light


SCALING_LOADS = ("per_server", "fixed_total")


def scaling_config(cfg: PaperConfig, load: str, num_servers: int) -> PaperConfig:
  """The sweep's config at one cluster size: ``per_server`` keeps every server's arrival rate
  (the offered load grows with the cluster), ``fixed_total`` spreads the testbed's total rate
  over the servers (the same workload on more GPUs) and runs ``scaling_fixed_duration_s``."""
  base = len(cfg.workload(cfg.scaling_workload).homes)
  factor = num_servers / base if load == "fixed_total" else 1.0
  duration = cfg.scaling_fixed_duration_s if load == "fixed_total" else cfg.scaling_duration_s
  workloads = tuple(dataclasses.replace(w, interarrival_s=w.interarrival_s * factor)
                    if w.name == cfg.scaling_workload else w for w in cfg.workloads)
  return dataclasses.replace(cfg, workloads=workloads, duration_s=duration,
                             profile_duration_s=min(cfg.profile_duration_s, duration))


def run_scaling(cfg: PaperConfig, seed: int | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
  """Mean request latency of ``scaling_methods`` for every (load, GPUs, link) of the sweep."""
  seed = cfg.seed if seed is None else seed
  rows = []
  for load in cfg.scaling_loads:
    for gpus in cfg.scaling_gpus:
      for mbps in cfg.scaling_link_mbps:
        t0 = time.perf_counter()
        servers = len(PATTERN_SERVERS) * gpus // 4
        run = scaling_config(cfg, load, servers)
        planned = plan_setting(run, cfg.scaling_model, cfg.scaling_workload, seed, gpus, mbps,
                               pool=cfg.scaling_pool)
        s = planned.setting
        requests = workload_requests(run, s.workload, servers, run.duration_s, seed)
        for m in cfg.scaling_methods:
          placement = registry.place(m, planned.problem, context=planned.context)
          try:
            res = serve(run, s, planned.cost, placement, requests, seed, pool=cfg.scaling_pool)
            row = result_row(planned, m, res)
          except QueueDivergesError as e:
            row = result_row(planned, m, None, f"queue diverges: {e}")
          rows.append(dict(load=load, gpus=gpus, servers=servers, link_mbps=mbps, **{
              k: row[k] for k in ("method", "mean_latency_s", "p99_latency_s", "ttft_s",
                                  "tpot_s", "cross_kb_per_token", "coverage", "requests",
                                  "busy_fraction")}))
        log(f"  scaling ({load}) {gpus} GPUs ({servers} servers) at {mbps:g} Mbps "
            f"({time.perf_counter() - t0:.0f} s)")
  return rows
