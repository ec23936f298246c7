"""What an experiment run computes: one typed, frozen :class:`ExperimentConfig`.

Presets live in ``configs/experiments/<name>.py`` (``get_config() -> ExperimentConfig``) and
are loaded with :func:`load_experiment` (``moe_edge.config.load_preset("experiments", name)``;
an unknown name lists the known ones). Command-line overrides go through
:func:`with_overrides`, which re-validates.

The same type serves the tables (``experiments/reproduce_tables.py``: models x clusters x
placement methods) and the ablations (``experiments/ablations.py``: the sweeps named in
``sweeps``); each script reads the fields it needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ml_collections import config_dict

from moe_edge.config import ConfigError, available, load_preset
from moe_edge.placement import registry

#: Method selectors besides method names: ``all`` (every registered method) and the roles.
METHOD_SELECTORS = ("all",) + registry.ROLES
#: How the compute terms of the cost model are calibrated (see ``calibration.py``).
CALIBRATIONS = ("datasheet", "h100_kernels", "h200_grouped")
#: The ablation sweeps ``experiments/ablations.py`` knows (see ``sweeps.py``).
SWEEPS = ("link_bandwidth", "num_servers", "memory", "alpha", "parts", "migration",
          "extensions")
#: DanceMoE's parts that the ``parts`` sweep switches off one at a time.
PARTS = ("entropy_budgets", "hetero_aware", "replicas", "exchange", "refine")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One experiment run.

  Tables:
    models: model presets (``configs/models``). ``olmoe_1b_7b`` / ``mixtral_8x7b`` are driven by
      their real routing statistics, ``deepseek_v2_lite`` by OLMoE's statistics reshaped to it
      (the paper experiment's stand-in, ``workload/standin.py``), ``small_moe`` by its own
      recorded traces, any other model by small-model traces mapped to its shape
      (``trace_mapping.py``).
    clusters: cluster presets (``configs/clusters``), at ``link_gbps``.
    methods: placement methods: registered names, ``all`` (every registered method, the
      default) or roles (``ours``, ``paper``, ``baseline``, ``oracle``), expanded in
      registration order (``moe_edge/placement/registry.py``); an oracle (``ilp``) runs where
      the instance is within its size limit.
    copies: expert memory of the cluster as full copies of the model's experts
      (:func:`moe_edge.config.with_expert_memory`).
    bytes_per_param: ``(model, bytes)`` pairs overriding a model's served weight format
      (Mixtral-8x7B needs 4-bit = 0.5 to fit on four edge servers).
    alpha: share of a server's requests from its home domain (one home domain per server).
    tokens_per_server: tokens per server of each statistics-driven trace.
    request_len: tokens per request of the statistics-driven traces.
    small_requests_per_server, small_seq_len: the small model's request streams (real held-out
      text).
    checkpoint: the trained small model (relative paths are relative to the repository).
    trace_cache: folder for the recorded small-model traces ("" = do not cache).
    mapping_seed: seed of the small-to-large expert mapping.
    profile_seed_offset: placements are planned on a *profiling* trace drawn with
      ``seed + profile_seed_offset`` and costed on the evaluation trace drawn with ``seed``.
    decode_batch: concurrent requests per server in a decode step.
    prefill_requests: requests per server in a prefill batch.
    calibration: ``"datasheet"`` (efficiency 1.0), ``"h100_kernels"`` (H100-measured expert
      kernel efficiency applied to the edge GPUs' datasheet numbers) or ``"h200_grouped"``
      (the H200-measured grouped expert FFN's, see ``moe_edge/cost/ffn_calibration.py``).
    ilp_time_limit: seconds HiGHS may search per ILP instance.
    bound_lp_max_cells: the lower bound also solves the facility-location LP
      (``placement/lp_bound.py``) on settings of at most this many routing variables ``N (N -
      1) L E`` (0: never; about 2-3 s per 10^3 of them on two cores: 2.5 min for OLMoE on 8
      servers, 57,344).
    request_duration_s, request_rate, request_output_tokens: the request-level columns
      (``request_rows.py``): every placement also serves ``request_duration_s`` seconds of
      Poisson arrivals at ``request_rate`` per server (prompts of ``request_len``, outputs of
      ``request_output_tokens``) on the request-level simulator, for the models with routing
      statistics (0 = off).
  Extensions (``extension_rows.py``; off by default):
    extension_rows: add rows ``dancemoe+subst(tau)`` and ``dancemoe+budget(B)`` to ``small_moe``
      (with the next-token loss change on the evaluation trace) and the weight-free
      ``dancemoe+drop(tau)`` to every other model.
    substitution_threshold: ``tau``, the gate below which a remote choice is substituted or
      dropped.
    budget_remote_choices: ``B``, the latency budget per token and layer of budgeted selection
      (top-1 forced) in units of the cluster's mean cost of one remote choice.
    extension_thresholds: the ``tau`` values of the ``extensions`` sweep (``small_moe``).
    extension_calib_requests: calibration requests per corpus domain (train split) for the
      output similarity of substitution.
  Cross-check (cost model vs the real dispatch on 8 host CPU devices):
    crosscheck: run it.
    crosscheck_methods: placements to time.
    crosscheck_steps: prefill steps (one request per server each) to time.
    crosscheck_repeats: timed calls per step and layer (median).
  Ablations:
    sweeps: which of :data:`SWEEPS` to run.
    sweep_models: models of the sweeps (statistics-driven ones: ``olmoe_1b_7b``,
      ``mixtral_8x7b``).
    sweep_cluster: cluster of the sweeps that do not vary it.
    sweep_methods: methods compared in the sweeps.
    sweep_tokens_per_server: tokens per server of the sweeps' traces.
    link_gbps_values: link bandwidths (Gbit/s; latency held at 0.5 ms).
    server_counts: cluster sizes (device types of edge_hetero_8 cycled, flat 1 Gbps LAN).
    copies_values: expert memory in copies; ``inf`` = every server holds every expert.
    alpha_values: locality values.
    migration_steps, migration_interval, migration_request_len, migration_max_moves: the
      drifting workload of the migration ablation (steps = requests per server; the servers'
      home domains swap in pairs at 1/3 and 2/3 of the run) and the incremental planner's
      copies per interval.
  """
  name: str
  description: str = ""
  seed: int = 0
  # ---- tables ------------------------------------------------------------------------------
  models: tuple[str, ...] = ("olmoe_1b_7b", "mixtral_8x7b", "small_moe", "deepseek_v2_lite",
                             "qwen1_5_moe_a2_7b")
  clusters: tuple[str, ...] = ("edge_hetero_4", "edge_hetero_8")
  methods: tuple[str, ...] = ("all",)
  link_gbps: float = 1.0
  copies: float = 1.5
  bytes_per_param: tuple[tuple[str, float], ...] = (("mixtral_8x7b", 0.5),)
  alpha: float = 0.8
  tokens_per_server: int = 8192
  request_len: int = 128
  small_requests_per_server: int = 32
  small_seq_len: int = 128
  checkpoint: str = "checkpoints/small_moe/final"
  trace_cache: str = "results/tables/traces"
  mapping_seed: int = 0
  profile_seed_offset: int = 1000
  decode_batch: int = 8
  prefill_requests: int = 1
  calibration: str = "h200_grouped"
  ilp_time_limit: float = 60.0
  bound_lp_max_cells: int = 0
  request_duration_s: float = 0.0
  request_rate: float = 0.1
  request_output_tokens: int = 64
  # ---- extensions --------------------------------------------------------------------------
  extension_rows: bool = False
  substitution_threshold: float = 0.2
  budget_remote_choices: float = 1.0
  extension_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
  extension_calib_requests: int = 8
  # ---- cross-check -------------------------------------------------------------------------
  crosscheck: bool = False
  crosscheck_methods: tuple[str, ...] = ("uniform_ep", "greedy_local", "dancemoe")
  crosscheck_steps: int = 4
  crosscheck_repeats: int = 3
  # ---- ablations ---------------------------------------------------------------------------
  sweeps: tuple[str, ...] = ()
  sweep_models: tuple[str, ...] = ("olmoe_1b_7b", "mixtral_8x7b")
  sweep_cluster: str = "edge_hetero_4"
  sweep_methods: tuple[str, ...] = ("ours", "paper", "baseline")
  sweep_tokens_per_server: int = 4096
  link_gbps_values: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
  server_counts: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16)
  copies_values: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, math.inf)
  alpha_values: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
  migration_steps: int = 48
  migration_interval: int = 8
  migration_request_len: int = 64
  migration_max_moves: int = 96

  def __post_init__(self):
    for key in ("models", "clusters", "methods", "bytes_per_param", "crosscheck_methods",
                "sweeps", "sweep_models", "sweep_methods", "link_gbps_values", "server_counts",
                "copies_values", "alpha_values", "extension_thresholds"):
      value = getattr(self, key)
      if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ConfigError(f"experiment {self.name!r}: {key} must be a tuple, got {value!r}.")
      object.__setattr__(self, key, tuple(tuple(v) if isinstance(v, list) else v
                                          for v in value))
    self._check_names("models", self.models + self.sweep_models, available("models"))
    self._check_names("clusters", self.clusters + (self.sweep_cluster,), available("clusters"))
    for key in ("methods", "crosscheck_methods", "sweep_methods"):
      object.__setattr__(self, key, self._expand_methods(key))
    self._check_names("sweeps", self.sweeps, SWEEPS)
    oracles = [m for m in self.crosscheck_methods + self.sweep_methods
               if registry.role(m) == "oracle"]
    if oracles:
      raise ConfigError(f"experiment {self.name!r}: oracle methods ({', '.join(oracles)}) only "
                        f"run in the tables (methods), not in the cross-check or the sweeps.")
    if not self.models or not self.clusters or not self.methods:
      raise ConfigError(f"experiment {self.name!r}: models, clusters and methods must not be "
                        f"empty.")
    if self.calibration not in CALIBRATIONS:
      raise ConfigError(f"experiment {self.name!r}: calibration must be one of {CALIBRATIONS}, "
                        f"got {self.calibration!r}.")
    for model, b in self.bytes_per_param:
      if model not in available("models") or not b > 0:
        raise ConfigError(f"experiment {self.name!r}: bytes_per_param entry ({model!r}, {b}) "
                          f"needs a known model and a positive byte count.")
    positive = ("tokens_per_server", "request_len", "small_requests_per_server",
                "small_seq_len", "decode_batch", "prefill_requests", "ilp_time_limit",
                "crosscheck_steps", "crosscheck_repeats", "sweep_tokens_per_server",
                "link_gbps", "migration_steps", "migration_interval", "migration_request_len",
                "extension_calib_requests", "request_rate", "request_output_tokens")
    for key in positive:
      if not getattr(self, key) > 0:
        raise ConfigError(f"experiment {self.name!r}: {key} must be positive, got "
                          f"{getattr(self, key)!r}.")
    if not (isinstance(self.bound_lp_max_cells, int) and self.bound_lp_max_cells >= 0):
      raise ConfigError(f"experiment {self.name!r}: bound_lp_max_cells must be an integer >= 0 "
                        f"(0 turns the LP bound off), got {self.bound_lp_max_cells!r}.")
    for t in (self.substitution_threshold, self.budget_remote_choices) + tuple(
        self.extension_thresholds):
      if not (t >= 0 and math.isfinite(t)):
        raise ConfigError(f"experiment {self.name!r}: substitution_threshold, "
                          f"budget_remote_choices and extension_thresholds must be finite and "
                          f">= 0, got {t!r}.")
    if not (self.request_duration_s >= 0 and math.isfinite(self.request_duration_s)):
      raise ConfigError(f"experiment {self.name!r}: request_duration_s must be >= 0 seconds (0: "
                        f"no request-level columns), got {self.request_duration_s!r}.")
    if self.migration_max_moves < 0:
      raise ConfigError(f"experiment {self.name!r}: migration_max_moves must be >= 0.")
    if self.migration_steps < 3 * self.migration_interval:
      raise ConfigError(f"experiment {self.name!r}: migration_steps={self.migration_steps} must "
                        f"cover at least 3 intervals of {self.migration_interval} steps (the "
                        f"homes change at 1/3 and 2/3 of the run).")
    for key in ("copies",) + (("copies_values",) if self.copies_values else ()):
      vals = getattr(self, key)
      for c in (vals if isinstance(vals, tuple) else (vals,)):
        if not c >= 1:
          raise ConfigError(f"experiment {self.name!r}: {key} must be >= 1 (every expert held "
                            f"at least once), got {c}.")
    for key in ("alpha",) + (("alpha_values",) if self.alpha_values else ()):
      vals = getattr(self, key)
      for a in (vals if isinstance(vals, tuple) else (vals,)):
        if not 0.0 <= a <= 1.0:
          raise ConfigError(f"experiment {self.name!r}: {key} must lie in [0, 1], got {a}.")
    if any(not v > 0 for v in self.link_gbps_values):
      raise ConfigError(f"experiment {self.name!r}: link_gbps_values must be positive.")
    if any(int(n) != n or n < 2 for n in self.server_counts):
      raise ConfigError(f"experiment {self.name!r}: server_counts must be integers >= 2.")

  def _expand_methods(self, key: str) -> tuple[str, ...]:
    """``key``'s entries as registered method names, in order, without repeats: a name stays,
    ``all`` is every registered method, a role every method of that role."""
    known = registry.names()
    out: list[str] = []
    for entry in getattr(self, key):
      if entry == "all":
        picked = known
      elif entry in registry.ROLES:
        picked = registry.names(entry)
      elif entry in known:
        picked = [entry]
      else:
        raise ConfigError(f"experiment {self.name!r}: unknown {key} entry {entry!r}; use a "
                          f"registered method ({', '.join(known)}), 'all' or a role "
                          f"({', '.join(registry.ROLES)}).")
      out += [m for m in picked if m not in out]
    return tuple(out)

  def _check_names(self, what: str, names: tuple[str, ...], known) -> None:
    unknown = sorted({n for n in names if n not in known})
    if unknown:
      raise ConfigError(f"experiment {self.name!r}: unknown {what} {unknown}; known: "
                        f"{', '.join(known)}.")

  def served_bytes_per_param(self, model: str) -> float | None:
    """The override of ``model``'s weight format, or None."""
    for name, b in self.bytes_per_param:
      if name == model:
        return float(b)
    return None

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (``inf`` written as the string ``"inf"``)."""
    out = dataclasses.asdict(self)
    out["copies_values"] = [("inf" if math.isinf(c) else c) for c in self.copies_values]
    return out


def experiment_preset(**values) -> config_dict.ConfigDict:
  """What a preset's ``get_config()`` returns: every :class:`ExperimentConfig` field (its
  default, or ``values``) in a ConfigDict, so ``--config.KEY=VALUE`` can override any of them."""
  out = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)
         if f.default is not dataclasses.MISSING}
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExperimentConfig)})
  if unknown:
    raise ConfigError(f"unknown ExperimentConfig fields {unknown}.")
  out.update(values)
  return config_dict.ConfigDict(out)


def build_experiment(values: Mapping[str, Any] | config_dict.ConfigDict) -> ExperimentConfig:
  """The validated frozen :class:`ExperimentConfig` of a preset's ConfigDict (or mapping)."""
  if isinstance(values, config_dict.ConfigDict):
    values = values.to_dict()
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExperimentConfig)})
  if unknown:
    raise ConfigError(f"unknown ExperimentConfig fields {unknown}.")
  if "name" not in values:
    raise ConfigError("an experiment config needs a name.")
  return ExperimentConfig(**values)


def load_experiment(name: str) -> ExperimentConfig:
  """``configs/experiments/<name>.py:get_config()`` built into an :class:`ExperimentConfig`;
  unknown names list the known ones."""
  cfg = load_preset("experiments", name)
  if isinstance(cfg, config_dict.ConfigDict):
    return build_experiment(cfg)
  if not isinstance(cfg, ExperimentConfig):
    raise ConfigError(f"configs/experiments/{name}.py must return a ConfigDict of "
                      f"ExperimentConfig fields, got {type(cfg).__name__}.")
  return cfg


def with_overrides(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
  """Copy of ``cfg`` with ``changes`` (None values are ignored); validated again."""
  unknown = sorted(k for k in changes if k not in {f.name for f in dataclasses.fields(cfg)})
  if unknown:
    raise ConfigError(f"unknown ExperimentConfig fields {unknown}.")
  return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
