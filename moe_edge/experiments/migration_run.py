r"""The migration experiment behind ``experiments/migration.py`` and ``migration_sweep.py``.

:class:`MigrationRun` holds every setting (workload, cluster, goals, failure drill, and the
replay's :class:`~moe_edge.migration.config.MigrationConfig`); :func:`run_migration` builds the
workload, runs the one replay pipeline (:func:`moe_edge.migration.replay.replay`), costs every
interval and policy with the cost model and measures the goals:

* per interval and policy (:func:`interval_rows`): local coverage and the cost model's step
  latency on the interval's actual tokens (:func:`moe_edge.cost.model.evaluate`), the expected
  latency on the interval's statistics, the objective, and the copies (moves), bytes and
  transfer time of the migration applied at the interval's start;
* per shift (:func:`recovery`): intervals until the incremental policy's coverage is back to
  ``coverage_target`` of the full re-plan's, with at most ``move_fraction`` of the copies of the
  re-plan that follows the shift, next to a lower bound on the copies *any* plan needs
  (:func:`~moe_edge.migration.incremental.min_copies_for_coverage`);
* optionally a failure drill on the incremental policy's placement (:func:`failure_drill`).

Settings are given as one flat mapping (a ConfigDict of ``configs/experiments/migration.py``
with ``--config.x=y`` overrides): :meth:`MigrationRun.from_flat`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

import numpy as np

from moe_edge.config import (ClusterConfig, ConfigError, ModelConfig, available, cluster_config,
                             model_config, with_expert_memory)
from moe_edge.cost.model import evaluate, expected_cost
from moe_edge.migration import fail_server, min_copies_for_coverage, objective_value
from moe_edge.migration.config import MigrationConfig
from moe_edge.migration.drift import DRIFT_PRESETS, drift_preset, drifting_trace
from moe_edge.migration.replay import Replay, replay
from moe_edge.workload.streams import DriftSchedule
from moe_edge.workload.traces import ActivationTrace

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class MigrationRun:
  """One migration experiment.

  Attributes:
    source: ``"stats"`` (sample from the real routing counts of ``model``) or the path of a
      recorded ActivationTrace ``.npz`` (its drift steps read from its metadata).
    model: model preset; for ``source="stats"`` also the routing statistics.
    cluster, link_gbps: cluster preset and its link speed (Gbit/s).
    copies: expert memory as full copies of the model's experts (0 = the servers' real memory).
    alpha: share of a server's requests from its home domain.
    seed: seed of the sampled trace and of the placement method.
    request_len: tokens per request = tokens per server per trace step.
    steps: trace steps (requests per server) for ``source="stats"``.
    drift: home changes ``'step:home0,home1,...;...'`` (None: ``drift_preset``).
    drift_preset: one of :data:`~moe_edge.migration.drift.DRIFT_PRESETS`.
    fail_server, fail_step: failure drill on the incremental policy's placement (-1 = none).
    storage_gbps: failure drill: checkpoint read bandwidth (GB/s).
    coverage_target: recovered = coverage >= target x the full re-plan's.
    recovery_intervals: goal: recovered within this many intervals.
    move_fraction: goal: at most this share of the full re-plan's copies.
    migration: the replay's settings.
  """
  source: str = "stats"
  model: str = "olmoe_1b_7b"
  cluster: str = "edge_hetero_4"
  link_gbps: float = 1.0
  copies: float = 1.5
  alpha: float = 0.8
  seed: int = 0
  request_len: int = 64
  steps: int = 96
  drift: str | None = None
  drift_preset: str = "pairs"
  fail_server: int = -1
  fail_step: int = -1
  storage_gbps: float = 2.0
  coverage_target: float = 0.95
  recovery_intervals: int = 2
  move_fraction: float = 0.25
  migration: MigrationConfig = MigrationConfig()

  def __post_init__(self):
    if self.model not in available("models"):
      raise ConfigError(f"unknown model {self.model!r}; known: {', '.join(available('models'))}.")
    if self.cluster not in available("clusters"):
      raise ConfigError(f"unknown cluster {self.cluster!r}; known: "
                        f"{', '.join(available('clusters'))}.")
    for key in ("request_len", "steps", "recovery_intervals"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
        raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}.")
    for key in ("link_gbps", "storage_gbps"):
      if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
        raise ConfigError(f"{key} must be positive, got {getattr(self, key)!r}.")
    if not (self.copies == 0 or self.copies >= 1):
      raise ConfigError(f"copies must be >= 1 (every expert held at least once) or 0 (the "
                        f"servers' real memory), got {self.copies!r}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha!r}.")
    if self.drift_preset not in DRIFT_PRESETS:
      raise ConfigError(f"drift_preset must be one of {DRIFT_PRESETS}, got "
                        f"{self.drift_preset!r}.")
    if self.drift is not None:
      DriftSchedule.parse(self.drift)  # raises on a malformed schedule
    if not (0.0 < self.coverage_target <= 1.0 and 0.0 <= self.move_fraction):
      raise ConfigError(f"need 0 < coverage_target <= 1 and move_fraction >= 0, got "
                        f"{self.coverage_target!r}, {self.move_fraction!r}.")
    if self.seed != self.migration.seed:
      raise ConfigError(f"seed {self.seed} and migration.seed {self.migration.seed} differ; "
                        f"one seed drives the trace and the placements.")

  @classmethod
  def from_flat(cls, values: Mapping[str, Any]) -> "MigrationRun":
    """From one flat mapping of every setting (the replay's included; ``seed`` feeds both)."""
    values = dict(values)
    own = {f.name for f in dataclasses.fields(cls)} - {"migration"}
    replay_keys = set(MigrationConfig.field_names())
    unknown = sorted(set(values) - own - replay_keys)
    if unknown:
      raise ConfigError(f"unknown migration settings {unknown}; known: "
                        f"{', '.join(sorted(own | replay_keys))}.")
    mig = {k: values.pop(k) for k in list(values) if k in replay_keys}
    if "policies" in mig:
      mig["policies"] = tuple(mig["policies"])
    mig["seed"] = values.get("seed", cls.seed)
    return cls(**values, migration=MigrationConfig(**mig))

  def to_flat(self) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k != "migration"}
    out.update(dataclasses.asdict(self.migration))
    out["policies"] = list(self.migration.policies)
    return out

  def replace(self, **changes) -> "MigrationRun":
    """Copy with flat ``changes`` (replay settings included), validated again."""
    return MigrationRun.from_flat(dict(self.to_flat(), **changes))


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def load_workload(run: MigrationRun, num_servers: int) -> tuple[ActivationTrace, list[int], str]:
  """``(trace, drift steps, model name)`` of ``run``."""
  interval = run.migration.interval
  if run.source == "stats":
    drift = (DriftSchedule.parse(run.drift) if run.drift
             else drift_preset(run.drift_preset, num_servers, run.steps, interval))
    trace = drifting_trace(run.model, num_servers, run.steps, run.request_len, run.alpha,
                           run.seed, drift)
    return trace, [s for s, _ in drift.changes], run.model
  trace = ActivationTrace.load(run.source)
  shifts = []
  if run.drift:
    shifts = [s for s, _ in DriftSchedule.parse(run.drift).changes]
  else:
    try:
      note = json.loads(trace.note)
      if note.get("drift"):
        shifts = [s for s, _ in DriftSchedule.parse(note["drift"]).changes]
    except (json.JSONDecodeError, AttributeError):
      pass
  return trace, shifts, trace.model


def setup(run: MigrationRun) -> tuple[ActivationTrace, list[int], ModelConfig, ClusterConfig]:
  """The workload, model and cluster (expert memory for ``run.copies`` copies) of ``run``."""
  cluster = cluster_config(run.cluster, link_gbps=run.link_gbps)
  trace, shifts, model_name = load_workload(run, cluster.num_servers)
  model = model_config(model_name)
  if run.copies > 0:
    cluster = with_expert_memory(cluster, model, run.copies)
  return trace, shifts, model, cluster


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def interval_rows(rep: Replay, model: ModelConfig, cluster: ClusterConfig) -> list[dict]:
  """One row per interval and policy (module docstring), intervals outer."""
  rows = []
  w, lam = rep.config.interval, rep.config.lam
  for i, (win, truth) in enumerate(zip(rep.windows, rep.truths)):
    for name in rep.config.policies:
      st = rep.history[name][i]
      cost = evaluate(win, model, cluster, st.placement, "decode")
      exp = expected_cost(truth, st.placement, truth.tokens, "decode")
      rows.append(dict(
          policy=name, interval=i, first_step=i * w, coverage=cost.coverage,
          latency_ms=1e3 * cost.latency, expected_latency_ms=1e3 * exp.latency,
          objective=objective_value(truth, st.placement, lam), moves=st.moves,
          mb_moved=st.moves * model.expert_bytes / 1e6, changed_experts=st.changed,
          transfer_s=st.transfer_s, drift=st.drift, saving_ms=st.saving_ms, gain_s=st.gain_s,
          cost_s=st.cost_s, note=st.note))
  return rows


def series(rows: list[dict], policy: str, key: str) -> np.ndarray:
  return np.array([r[key] for r in rows if r["policy"] == policy])


def _fewest_copies(run: MigrationRun, rep: Replay, start, k: int, end: int,
                   cov_f: np.ndarray) -> int | None:
  """Lower bound on the copies any plan from ``start`` needs to recover in time."""
  bounds = [min_copies_for_coverage(rep.truths[j], start, run.coverage_target * cov_f[j])
            for j in range(k + 1, min(end, k + 1 + run.recovery_intervals))]
  bounds = [b for b in bounds if b is not None]
  return min(bounds) if bounds else None


def _shift_recovery(run: MigrationRun, rep: Replay, rows: list[dict], shifts: list[int],
                    s: int) -> dict | None:
  """:func:`recovery` of one shift (None when it falls in the last interval)."""
  cov_i, cov_f = series(rows, "incremental", "coverage"), series(rows, "full_replan", "coverage")
  lat_i = series(rows, "incremental", "latency_ms")
  lat_f = series(rows, "full_replan", "latency_ms")
  mv_i, mv_f = series(rows, "incremental", "moves"), series(rows, "full_replan", "moves")
  n, interval = len(cov_i), rep.config.interval
  k = s // interval  # the interval the shift falls in
  if k + 1 >= n:
    return None
  nxt = [x for x in shifts if x > s]
  end = min(n, (nxt[0] // interval) + 1 if nxt else n)  # look no further than the next shift
  rec = next((j - k for j in range(k + 1, end) if cov_i[j] >= run.coverage_target * cov_f[j]),
             None)
  rec_lat = next((j - k for j in range(k + 1, end)
                  if lat_i[j] <= lat_f[j] / run.coverage_target), None)
  upto = k + (rec if rec is not None else end - 1 - k)
  inc_moves = int(mv_i[k + 1:upto + 1].sum())
  full_moves = int(mv_f[k + 1])  # the one re-plan that adapts to the shift
  need = _fewest_copies(run, rep, rep.history["incremental"][k].placement, k, end, cov_f)
  # ... and from the re-plan policy's own placement before the shift
  need_full = _fewest_copies(run, rep, rep.history["full_replan"][k].placement, k, end, cov_f)
  return dict(step=int(s), interval=int(k), intervals_to_recover=rec,
              ratio_at_recovery=None if rec is None else float(cov_i[k + rec] / cov_f[k + rec]),
              incremental_moves=inc_moves, full_replan_moves=full_moves,
              move_share=inc_moves / full_moves if full_moves else None,
              full_policy_moves_same_intervals=int(mv_f[k + 1:upto + 1].sum()),
              min_copies_any_plan=need,
              min_share_any_plan=need / full_moves if need is not None and full_moves else None,
              min_copies_from_replan_state=need_full,
              goal_met=rec is not None and rec <= run.recovery_intervals
              and inc_moves <= run.move_fraction * full_moves,
              goal_feasible=need is not None and need <= run.move_fraction * full_moves,
              intervals_to_recover_latency=rec_lat,
              moves_to_recover_latency=None if rec_lat is None
              else int(mv_i[k + 1:k + rec_lat + 1].sum()))


def recovery(run: MigrationRun, rep: Replay, rows: list[dict], shifts: list[int]) -> list[dict]:
  """Per shift: intervals until the incremental policy's coverage is back to the target share
  of the full re-plan's (1 = the first interval planned after the shift), the copies each
  policy made to get there, and a lower bound on the copies *any* plan needs to recover within
  ``recovery_intervals`` (:func:`moe_edge.migration.incremental.min_copies_for_coverage` on the
  intervals' actual statistics, where coverage is exactly what the table reports), also from the
  re-plan policy's own placement before the shift. The same for the step latency: intervals
  until it is within ``1 / coverage_target`` of the re-plan's. Needs both the ``incremental``
  and the ``full_replan`` policy."""
  missing = {"incremental", "full_replan"} - set(rep.config.policies)
  if missing:
    raise ConfigError(f"the recovery goal compares incremental with full_replan; the policies "
                      f"{sorted(missing)} were not run.")
  out = [_shift_recovery(run, rep, rows, shifts, s) for s in shifts]
  return [r for r in out if r is not None]


def failure_drill(run: MigrationRun, rep: Replay, model: ModelConfig,
                  cluster: ClusterConfig) -> dict | None:
  """Lose ``run.fail_server`` during the interval of ``run.fail_step`` (incremental policy's
  placement): what the cost model and :func:`~moe_edge.migration.failure.fail_server` say; None
  when the step lies outside the trace."""
  i = run.fail_step // rep.config.interval
  if run.fail_step < 0 or i >= rep.num_intervals:
    return None
  placement, truth, win = (rep.history["incremental"][i].placement, rep.truths[i],
                           rep.windows[i])
  s = run.fail_server
  new, r = fail_server(placement, s, truth, run.storage_gbps * 1e9)
  rest = win.select(win.server != s)
  before = evaluate(rest, model, cluster, placement, "decode")
  after = evaluate(rest, model, cluster, new, "decode")
  return dict(server=s, interval=i, lost_replicas=r.lost_replicas, orphans=len(r.orphans),
              unreachable_during_recovery=len(r.unreachable_during_recovery),
              rerouted_share=r.rerouted_share, reloads=len(r.reloads),
              evicted=len(r.evicted), storage_gb=r.storage_bytes / 1e9,
              recovery_s=r.recovery_s, coverage_before=before.coverage,
              coverage_after=after.coverage, latency_ms_before=1e3 * before.latency,
              latency_ms_after=1e3 * after.latency)


def summarize(run: MigrationRun, rep: Replay, rows: list[dict], shifts: list[int],
              model: ModelConfig, cluster: ClusterConfig) -> dict:
  """``summary.json``: per policy the means and totals, the recovery per shift, the goals and
  (with a drill) the failure."""
  summary = dict(model=model.name, cluster=cluster.name, shifts=shifts, policies={})
  for p in rep.config.policies:
    mv = series(rows, p, "moves")
    summary["policies"][p] = dict(
        mean_coverage=float(series(rows, p, "coverage").mean()),
        mean_latency_ms=float(series(rows, p, "latency_ms").mean()),
        total_moves=int(mv.sum()), total_gb=float(mv.sum() * model.expert_bytes / 1e9),
        total_transfer_s=float(series(rows, p, "transfer_s").sum()))
  rec = recovery(run, rep, rows, shifts)
  summary["recovery"] = rec
  tot_i = summary["policies"]["incremental"]["total_moves"]
  tot_f = summary["policies"]["full_replan"]["total_moves"]
  summary["total_move_share"] = tot_i / tot_f if tot_f else None
  summary["goals_met"] = bool(rec) and all(r["goal_met"] for r in rec)
  if run.fail_server >= 0:
    drill = failure_drill(run, rep, model, cluster)
    if drill is not None:
      summary["failure"] = drill
  return summary


@dataclasses.dataclass(frozen=True)
class MigrationResult:
  """What :func:`run_migration` returns: the replay, its rows and summary, and the set-up."""
  replay: Replay
  rows: list[dict]
  summary: dict
  shifts: list[int]
  model: ModelConfig
  cluster: ClusterConfig
  trace: ActivationTrace


def run_migration(run: MigrationRun, log: Log | None = None) -> MigrationResult:
  """Workload, replay, per-interval rows and summary of ``run`` (module docstring)."""
  trace, shifts, model, cluster = setup(run)
  capacity = cluster.expert_capacity(model)
  if log is not None:
    copies = capacity.sum() / (model.n_moe_layers * model.n_experts)
    log(f"{model.name} on {cluster.name}: N={cluster.num_servers}, L={model.n_moe_layers}, "
        f"E={model.n_experts}, expert {model.expert_bytes / 1e6:.1f} MB, capacity "
        f"{capacity.tolist()} experts ({copies:.2f} copies)")
    log(f"workload: {trace.num_tokens} tokens, {int(trace.step.max()) + 1} steps, interval "
        f"{run.migration.interval} steps, shifts at steps {shifts}")
  rep = replay(trace, model, cluster, capacity, run.migration, log)
  rows = interval_rows(rep, model, cluster)
  summary = summarize(run, rep, rows, shifts, model, cluster)
  return MigrationResult(rep, rows, summary, shifts, model, cluster, trace)
