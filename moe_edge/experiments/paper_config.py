"""The paper's experiment as one validated, frozen :class:`PaperConfig`.

Presets are ml_collections files (``configs/experiments/paper_testbed.py``,
``configs/experiments/paper_testbed_quick.py``) whose ``get_config()`` returns a
``ml_collections.ConfigDict``; ``experiments/paper_table.py --config=<file> --config.x=y``
overrides fields; :func:`paper_config` turns the ConfigDict into the frozen dataclass and checks
every field (one-line :class:`~moe_edge.config.ConfigError` naming the field and the fix).

What the fields mean (PAPER.md summarises the paper's set-up; what it does not state is chosen
here and said so):

* testbed: ``cluster`` preset (``paper_testbed``: 3 servers of 1, 1 and 2 A100-40GB) at
  ``link_mbps`` and ``latency_s``; ``memory_fraction`` per model (the paper's caps: 70% of each
  GPU for Mixtral-8x7B, 30% for DeepSeek-V2-Lite); ``kv_reserve_requests``: on every GPU
  placement leaves room for the KV caches of that many requests of the longest prompt plus the
  output (the scheduler spends it); ``pool_efficiency`` of the 2-GPU server.
* workloads (fixed before the first run): per workload the servers' home domains, the locality
  ``alpha`` (share of a server's requests from its home; the rest uniform over the other
  domains) and the mean Poisson inter-arrival time per server; prompts ``prompt_tokens``
  (uniform integers, inclusive) cut from held-out documents of the request's domain, a fixed
  ``output_tokens``; ``duration_s`` of arrivals per run (every request then runs to the end).
* ``light_load_factor``: a diagnostic, prism and eplb_hetero also serve arrivals this many
  times sparser (same placements), to show how much of a ratio is queueing.
* ``max_waiting``: a server with more requests waiting means the queue diverges (the offered
  load exceeds what the cluster serves with that placement): the row reports ``inf``.
* methods: the table's rows: ``methods`` plus, with ``include_ours``, every registered method of
  role ``ours`` (placement registry). ``pilot_method`` serves a pilot run of the profiling
  workload that measures the batches the scheduler forms (the methods' WorkloadSummary).
* shift: arrivals follow ``shift_from`` for ``shift_at_s`` seconds, then ``shift_to`` until
  ``shift_duration_s``; policies ``none`` (keep the first placement), ``paper`` (re-plan with
  ``prism`` every ``paper_replan_s`` on the last window's statistics, migrate when the
  candidate's communication cost plus the move cost is below the current communication cost)
  and ``ours`` (the repository's migration trigger on incremental plans of at most
  ``ours_max_moves`` copies, judged every ``ours_check_s``; ``ours_scoring``, ``ours_safety``
  and ``ours_interference`` are the trigger's scoring, safety factor and interference,
  :mod:`moe_edge.migration.trigger`). Weights move over the links (the
  repository's copy schedule) and serving stalls meanwhile.
* scaling: the paper's simulation, ``scaling_gpus`` GPUs (the 1-1-2 pattern repeated) x
  ``scaling_link_mbps``, ``scaling_methods`` on ``scaling_model`` with ``scaling_workload``;
  routing drawn from pools of ``scaling_pool`` exact top-k sets per (domain, layer) (0: every
  token drawn exactly, as in the table). ``scaling_loads``: ``per_server`` keeps every
  server's arrival rate (``scaling_duration_s`` of arrivals), ``fixed_total`` spreads the
  testbed's total rate over the servers (``scaling_fixed_duration_s``).
* calibrated (a diagnostic part): every modelled time scaled by one factor per setting, fitted
  so eplb_hetero's mean latency on the profiling requests is the paper's EPLB latency;
  ``calibrated_methods`` (plus every ``ours`` method with ``include_ours``) are then served
  (``moe_edge/experiments/paper_calibrated.py``).
* sweep (the ablation of the workload's knobs): for each ``sweep_settings`` entry
  ``"model:workload"``, ``sweep_alphas``, ``sweep_prompt_tokens`` and ``sweep_output_tokens``
  one at a time, ``sweep_methods`` re-planned and served for ``sweep_duration_s`` on the
  calibrated testbed (``moe_edge/experiments/paper_sweep.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from moe_edge.config import ConfigError, available
from moe_edge.migration.trigger import SCORINGS
from moe_edge.workload.corpus import DOMAINS

PAPER_MODELS = ("deepseek_v2_lite", "mixtral_8x7b")
SHIFT_POLICIES = ("none", "paper", "ours")
NAME_LISTS = ("models", "table_workloads", "methods", "shift_policies", "scaling_methods",
              "scaling_loads", "calibrated_methods", "sweep_settings", "sweep_methods")


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  """One request workload: ``homes [N]`` domains (one per server), locality ``alpha``, mean
  inter-arrival seconds per server (Poisson)."""
  name: str
  homes: tuple[str, ...]
  alpha: float
  interarrival_s: float

  def __post_init__(self):
    bad = [h for h in self.homes if h not in DOMAINS]
    if bad:
      raise ConfigError(f"workload {self.name!r}: domains {bad} are not in the routing "
                        f"statistics (they have {', '.join(DOMAINS)}); use those domains.")
    if not self.homes:
      raise ConfigError(f"workload {self.name!r}: homes must name one domain per server.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"workload {self.name!r}: alpha must lie in [0, 1], got {self.alpha}.")
    if not (self.interarrival_s > 0 and math.isfinite(self.interarrival_s)):
      raise ConfigError(f"workload {self.name!r}: interarrival_s must be a positive number of "
                        f"seconds, got {self.interarrival_s}.")


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
  """Continuous batching per server (the serving scheduler's options)."""
  max_batch: int = 16
  token_budget: int = 512
  prefill_chunk: int = 512
  policy: str = "fifo"


@dataclasses.dataclass(frozen=True)
class PaperConfig:
  """The paper's experiment (module docstring)."""
  name: str
  description: str
  seed: int
  models: tuple[str, ...]
  workloads: tuple[WorkloadSpec, ...]
  table_workloads: tuple[str, ...]
  methods: tuple[str, ...]
  include_ours: bool
  pilot_method: str
  cluster: str
  link_mbps: float
  latency_s: float
  pool_efficiency: float
  memory_fraction: tuple[tuple[str, float], ...]
  kv_reserve_requests: int
  light_load_factor: float
  calibration: str
  prompt_tokens: tuple[int, int]
  output_tokens: int
  duration_s: float
  profile_duration_s: float
  scheduler: SchedulerSpec
  max_waiting: int
  shift_model: str
  shift_from: str
  shift_to: str
  shift_at_s: float
  shift_duration_s: float
  shift_policies: tuple[str, ...]
  shift_method: str
  paper_replan_s: float
  ours_check_s: float
  ours_max_moves: int
  ours_scoring: str
  ours_safety: float
  ours_interference: float
  stats_window_s: float
  shift_bin_s: float
  scaling_model: str
  scaling_workload: str
  scaling_gpus: tuple[int, ...]
  scaling_link_mbps: tuple[float, ...]
  scaling_methods: tuple[str, ...]
  scaling_duration_s: float
  scaling_pool: int
  scaling_loads: tuple[str, ...]
  scaling_fixed_duration_s: float
  calibrated_methods: tuple[str, ...]
  sweep_settings: tuple[str, ...]
  sweep_alphas: tuple[float, ...]
  sweep_prompt_tokens: tuple[tuple[int, int], ...]
  sweep_output_tokens: tuple[int, ...]
  sweep_methods: tuple[str, ...]
  sweep_duration_s: float

  def __post_init__(self):
    where = f"paper experiment {self.name!r}"
    unknown = sorted(set(self.models + (self.shift_model, self.scaling_model))
                     - set(available("models")))
    if unknown:
      raise ConfigError(f"{where}: unknown models {unknown}; known: "
                        f"{', '.join(available('models'))}.")
    if self.cluster not in available("clusters"):
      raise ConfigError(f"{where}: unknown cluster {self.cluster!r}.")
    names = [w.name for w in self.workloads]
    for key in ("table_workloads",):
      bad = [w for w in getattr(self, key) if w not in names]
      if bad:
        raise ConfigError(f"{where}: {key} names {bad}, which are not among the workloads "
                          f"{names}.")
    for key in ("shift_from", "shift_to", "scaling_workload"):
      if getattr(self, key) not in names:
        raise ConfigError(f"{where}: {key}={getattr(self, key)!r} is not among the workloads "
                          f"{names}.")
    homes = {len(w.homes) for w in self.workloads}
    if len(homes) != 1:
      raise ConfigError(f"{where}: every workload must give one home per server (same count), "
                        f"got {sorted(homes)}.")
    fractions = dict(self.memory_fraction)
    missing = [m for m in set(self.models + (self.shift_model, self.scaling_model))
               if m not in fractions]
    if missing:
      raise ConfigError(f"{where}: memory_fraction has no entry for {sorted(missing)}; give "
                        f"the usable share of GPU memory per model.")
    if any(not 0 < f <= 1 for f in fractions.values()):
      raise ConfigError(f"{where}: memory_fraction values must lie in (0, 1].")
    lo, hi = self.prompt_tokens
    if not 1 <= lo <= hi or self.output_tokens < 1:
      raise ConfigError(f"{where}: prompt_tokens must be (lo, hi) with 1 <= lo <= hi and "
                        f"output_tokens >= 1, got {self.prompt_tokens}, {self.output_tokens}.")
    for key in ("link_mbps", "duration_s", "profile_duration_s", "shift_at_s",
                "shift_duration_s", "paper_replan_s", "ours_check_s", "stats_window_s",
                "shift_bin_s", "scaling_duration_s", "pool_efficiency", "light_load_factor"):
      v = getattr(self, key)
      if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{where}: {key} must be a positive finite number, got {v!r}.")
    if self.latency_s < 0 or self.kv_reserve_requests < 1:
      raise ConfigError(f"{where}: latency_s must be >= 0 and kv_reserve_requests >= 1.")
    if self.max_waiting < 1 or self.ours_max_moves < 1:
      raise ConfigError(f"{where}: max_waiting and ours_max_moves must be >= 1.")
    if self.ours_scoring not in SCORINGS:
      raise ConfigError(f"{where}: ours_scoring={self.ours_scoring!r}; use one of {SCORINGS}.")
    for key in ("ours_safety", "ours_interference"):
      v = getattr(self, key)
      if not (v >= 0 and math.isfinite(v)):
        raise ConfigError(f"{where}: {key} must be a finite number >= 0, got {v!r}.")
    if self.shift_at_s >= self.shift_duration_s:
      raise ConfigError(f"{where}: shift_at_s ({self.shift_at_s}) must come before "
                        f"shift_duration_s ({self.shift_duration_s}).")
    bad = [p for p in self.shift_policies if p not in SHIFT_POLICIES]
    if bad:
      raise ConfigError(f"{where}: unknown shift policies {bad}; use {SHIFT_POLICIES}.")
    if any(g < 4 or g % 4 for g in self.scaling_gpus):
      raise ConfigError(f"{where}: scaling_gpus must be multiples of 4 (1-1-2 groups).")
    bad = [x for x in self.scaling_loads if x not in ("per_server", "fixed_total")]
    if bad or not self.scaling_fixed_duration_s > 0:
      raise ConfigError(f"{where}: scaling_loads must be per_server and/or fixed_total (got "
                        f"{list(self.scaling_loads)}) and scaling_fixed_duration_s > 0.")
    if any(not b > 0 for b in self.scaling_link_mbps):
      raise ConfigError(f"{where}: scaling_link_mbps must be positive.")
    if not self.methods:
      raise ConfigError(f"{where}: methods must not be empty.")
    if "eplb_hetero" not in self.calibrated_methods or "prism" not in self.calibrated_methods:
      raise ConfigError(f"{where}: calibrated_methods must include eplb_hetero (the scale is "
                        f"fitted on it) and prism, got {list(self.calibrated_methods)}.")
    self._check_sweep(where, names)

  def _check_sweep(self, where: str, workloads: list[str]) -> None:
    for entry in self.sweep_settings:
      model, workload = sweep_setting(entry)
      if model not in available("models") or workload not in workloads:
        raise ConfigError(f"{where}: sweep_settings entry {entry!r} must be 'model:workload' "
                          f"with a known model and one of the workloads {workloads}.")
    if "eplb_hetero" not in self.sweep_methods or "prism" not in self.sweep_methods:
      raise ConfigError(f"{where}: sweep_methods must include eplb_hetero and prism, got "
                        f"{list(self.sweep_methods)}.")
    if any(not 0.0 <= a <= 1.0 for a in self.sweep_alphas):
      raise ConfigError(f"{where}: sweep_alphas must lie in [0, 1], got "
                        f"{list(self.sweep_alphas)}.")
    if any(len(p) != 2 or not 1 <= p[0] <= p[1] for p in self.sweep_prompt_tokens):
      raise ConfigError(f"{where}: sweep_prompt_tokens must be (lo, hi) pairs with 1 <= lo <= "
                        f"hi, got {list(self.sweep_prompt_tokens)}.")
    if any(t < 1 for t in self.sweep_output_tokens) or not (
        self.sweep_duration_s > 0 and math.isfinite(self.sweep_duration_s)):
      raise ConfigError(f"{where}: sweep_output_tokens must be >= 1 and sweep_duration_s a "
                        f"positive number of seconds.")

  def workload(self, name: str) -> WorkloadSpec:
    for w in self.workloads:
      if w.name == name:
        return w
    raise ConfigError(f"paper experiment {self.name!r} has no workload {name!r}; it has "
                      f"{[w.name for w in self.workloads]}.")

  def fraction(self, model: str) -> float:
    return float(dict(self.memory_fraction)[model])

  @property
  def num_servers(self) -> int:
    return len(self.workloads[0].homes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def sweep_setting(entry: str) -> tuple[str, str]:
  """``"model:workload"`` -> ``(model, workload)`` (``PaperConfig`` checks that both exist)."""
  model, _, workload = entry.partition(":")
  return model, workload


def _tuple(v):
  if isinstance(v, (list, tuple)):
    return tuple(_tuple(x) for x in v)
  return v


def paper_config(cd: Mapping[str, Any]) -> PaperConfig:
  """The frozen, validated :class:`PaperConfig` of a ConfigDict (or any mapping) preset.

  ``cd.workloads`` maps a workload name to ``homes`` (a comma-separated string or a sequence),
  ``alpha`` and ``interarrival_s``; ``cd.memory_fraction`` maps a model to its share;
  ``cd.scheduler`` holds :class:`SchedulerSpec`'s fields. Unknown keys raise ConfigError.
  """
  d = dict(cd.to_dict() if hasattr(cd, "to_dict") else cd)
  fields = {f.name for f in dataclasses.fields(PaperConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"unknown paper-experiment fields {unknown}; known: {sorted(fields)}.")
  missing = sorted(fields - set(d))
  if missing:
    raise ConfigError(f"the paper-experiment preset lacks fields {missing}.")
  workloads = []
  for name, w in dict(d["workloads"]).items():
    homes = w["homes"]
    homes = tuple(h.strip() for h in homes.split(",")) if isinstance(homes, str) else tuple(homes)
    extra = sorted(set(w) - {"homes", "alpha", "interarrival_s"})
    if extra:
      raise ConfigError(f"workload {name!r}: unknown keys {extra} (use homes, alpha, "
                        f"interarrival_s).")
    workloads.append(WorkloadSpec(name, homes, float(w["alpha"]), float(w["interarrival_s"])))
  d["workloads"] = tuple(workloads)
  d["memory_fraction"] = tuple(sorted((str(k), float(v))
                                      for k, v in dict(d["memory_fraction"]).items()))
  sched = dict(d["scheduler"])
  extra = sorted(set(sched) - {f.name for f in dataclasses.fields(SchedulerSpec)})
  if extra:
    raise ConfigError(f"unknown scheduler fields {extra}.")
  d["scheduler"] = SchedulerSpec(**sched)
  for key, value in list(d.items()):
    if key not in ("workloads", "memory_fraction", "scheduler"):
      d[key] = _tuple(value)
      if key in NAME_LISTS:  # "a,b" (a command-line override) or ("a", "b")
        parts = (d[key],) if isinstance(d[key], str) else d[key]
        d[key] = tuple(x.strip() for v in parts for x in str(v).split(",") if x.strip())
  return PaperConfig(**d)
