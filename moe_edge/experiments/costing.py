"""Placing and costing one workload with registered methods: the step shared by the tables
(``tables.py``), ``experiments/place.py`` and the extension rows (docs/DESIGN.md,
"Experiments")."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.errors import CostError, PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost import Calibration, CostModel, CostReport, decode_batches, evaluate
from moe_edge.cost import prefill_batches
from moe_edge.placement import registry
from moe_edge.placement.registry import PlacementContext, WorkloadSummary


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method's placement and its costs.

  Attributes:
    method: the method's name.
    placement: the validated placement (None when the method refused the instance).
    seconds: wall time of the method.
    reports: phase (``"decode"`` / ``"prefill"``) -> :class:`~moe_edge.cost.CostReport`.
    error: why the method did not run (e.g. an instance too large for ``ilp``).
  """
  method: str
  placement: Placement | None
  seconds: float
  reports: dict
  error: str = ""


def phase_traces(trace: ActivationTrace, phase: str = "both", decode_batch: int = 8,
                 prefill_requests: int = 1) -> dict[str, ActivationTrace]:
  """``trace`` regrouped into decode steps and/or prefill batches, by phase."""
  if phase not in ("both", "decode", "prefill"):
    raise CostError(f"phase must be 'both', 'decode' or 'prefill', got {phase!r}.")
  out = {}
  if phase in ("both", "decode"):
    out["decode"] = decode_batches(trace, decode_batch)
  if phase in ("both", "prefill"):
    out["prefill"] = prefill_batches(trace, prefill_requests)
  return out


def cost_placement(placement: Placement, phases: dict[str, ActivationTrace], model: ModelConfig,
                   cluster: ClusterConfig,
                   calibration: Calibration | None = None) -> dict[str, CostReport]:
  """``{phase: evaluate(trace of that phase, ...)}``."""
  return {ph: evaluate(tr, model, cluster, placement, ph, calibration)
          for ph, tr in phases.items()}


def workload_summary(problem: PlacementProblem, phases: dict[str, ActivationTrace],
                     decode_batch: int, request_rate: float = 0.1,
                     prompt_tokens: float | None = None,
                     output_tokens: float = 64.0) -> WorkloadSummary:
  """The request workload the deployment of these phase traces serves, per server:
  ``request_rate`` requests per second (Poisson; the paper's 0.1/s per server by default),
  prompts of ``prompt_tokens`` (default: the trace's mean request length), ``output_tokens``
  output tokens, ``decode_batch`` concurrent decoding requests and the mean tokens of a
  server's prefill step in the prefill trace (default: one prompt)."""
  n = problem.shape[0]
  for name, v in (("request_rate", request_rate), ("output_tokens", output_tokens),
                  ("prompt_tokens", 1.0 if prompt_tokens is None else prompt_tokens)):
    if not (np.isfinite(v) and v > 0):
      raise CostError(f"workload: {name} must be a positive number, got {v!r}.")
  if prompt_tokens is None:
    trace = next(iter(phases.values()))
    lengths = np.bincount(trace.request - trace.request.min()).astype(np.float64)
    prompt_tokens = float(lengths[lengths > 0].mean())
  pre = phases.get("prefill")
  if pre is not None:
    per = np.bincount(pre.step.astype(np.int64) * n + pre.server, minlength=n).reshape(-1, n)
    prefill = np.array([per[per[:, m] > 0, m].mean() if (per[:, m] > 0).any() else 0.0
                        for m in range(n)])
  else:
    prefill = np.full(n, float(prompt_tokens))
  return WorkloadSummary(request_rate=np.full(n, float(request_rate)),
                         prompt_tokens=np.full(n, float(prompt_tokens)),
                         output_tokens=np.full(n, float(output_tokens)),
                         decode_batch=np.full(n, float(decode_batch)), prefill_tokens=prefill)


def planning_context(problem: PlacementProblem, phases: dict[str, ActivationTrace],
                     decode_batch: int, seed: int = 0,
                     calibration: Calibration | None = None,
                     workload: WorkloadSummary | None = None) -> PlacementContext:
  """What every method of :func:`cost_methods` knows: the seed, the cost model and the
  workload (default: :func:`workload_summary` with its defaults)."""
  return PlacementContext(seed=seed,
                          cost=CostModel.build(problem.model, problem.cluster, calibration),
                          workload=workload if workload is not None else
                          workload_summary(problem, phases, decode_batch))


def cost_methods(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
                 methods: Sequence[str], phase: str = "both", decode_batch: int = 8,
                 prefill_requests: int = 1, seed: int = 0,
                 calibration: Calibration | None = None,
                 profile: ActivationTrace | None = None, options: dict | None = None,
                 on_method: Callable[[str], None] | None = None,
                 requests: dict | None = None,
                 ) -> tuple[PlacementProblem, list[MethodResult]]:
  """Plan each method on ``profile`` (default: ``trace`` itself) and cost it on ``trace``.

  Every method sees the same problem (priced on the calibrated hardware: routes, objective and
  refinement use it) and the same :class:`~moe_edge.placement.registry.PlacementContext`: the
  seed, the :class:`~moe_edge.cost.CostModel` and the :func:`workload_summary` (the decode
  batch the deployment serves); a method uses what it needs.

  Args:
    methods: registered method names (``moe_edge.placement.registry.names()``).
    options: method name -> options for it (a mapping, e.g. ``{"ilp": {"time_limit": 60}}``).
    on_method: called with each method's name when it is done (progress display).
    requests: keyword arguments of :func:`workload_summary` (``request_rate`` in requests/s
      per server, ``prompt_tokens``, ``output_tokens``); its defaults when None.
  Returns:
    ``(problem, results)``: the placement problem (from the profiling trace) and one
    :class:`MethodResult` per method, in order (the workload they planned for is
    ``workload_summary(problem, phase_traces(trace, ...), decode_batch, **requests)``). A method that refuses the instance
    (``PlacementError``, e.g. ilp beyond its size limit) gets ``error`` set and no placement.
  """
  problem = PlacementProblem.from_trace(trace if profile is None else profile, model, cluster,
                                        calibration=calibration)
  phases = phase_traces(trace, phase, decode_batch, prefill_requests)
  workload = workload_summary(problem, phases, decode_batch, **(requests or {}))
  context = planning_context(problem, phases, decode_batch, seed, calibration, workload)
  results = []
  for name in methods:
    t0 = time.perf_counter()
    try:
      placement = registry.place(name, problem, (options or {}).get(name), context)
    except PlacementError as e:
      results.append(MethodResult(name, None, time.perf_counter() - t0, {}, str(e)))
    else:
      seconds = time.perf_counter() - t0
      placement.validate(problem)
      results.append(MethodResult(name, placement, seconds,
                                  cost_placement(placement, phases, model, cluster,
                                                 calibration)))
    if on_method is not None:
      on_method(name)
  return problem, results


def report_metrics(reports: dict[str, CostReport]) -> dict:
  """The tables' latency / bytes / coverage numbers of one placement (ms, kB, MB)."""
  out = {}
  dec, pre = reports.get("decode"), reports.get("prefill")
  any_rep = dec or pre
  out["coverage"] = any_rep.coverage
  out["cross_kb_per_token"] = any_rep.cross_bytes_per_token / 1e3  # phase-independent
  out["fits"] = any_rep.fits
  if dec is not None:
    out.update(decode_ms=1e3 * dec.latency, decode_exchange_ms=1e3 * dec.exchange_time,
               decode_compute_ms=1e3 * float(dec.compute_time.sum()),
               decode_dense_ms=1e3 * float(dec.dense_time.mean()),
               decode_cross_mb_per_step=dec.cross_bytes_per_step / 1e6)
  if pre is not None:
    out.update(prefill_ms=1e3 * pre.latency, prefill_exchange_ms=1e3 * pre.exchange_time,
               prefill_compute_ms=1e3 * float(pre.compute_time.sum()))
  return out
