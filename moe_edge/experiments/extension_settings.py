"""Validated frozen settings of the extension sweeps (``experiments/substitution_sweep.py`` and
``experiments/budget_sweep.py``), built from their ml_collections presets
(``configs/experiments/substitution_sweep.py``, ``budget_sweep.py``) with ``--config.KEY=VALUE``
overrides. One flat mapping per sweep: the shared workload settings of :class:`HarnessSettings`
and the sweep's own (:class:`SubstitutionSweepConfig`, :class:`BudgetSweepConfig`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from moe_edge.config import ConfigError, available
from moe_edge.extensions import harness
from moe_edge.extensions.budgeted import COST_KINDS

SIMILARITIES = ("output", "response", "flat", "random")
SOLVERS = ("greedy", "exact")


def _tuple(name: str, value, kind: type) -> tuple:
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    value = (value,)
  try:
    return tuple(kind(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"{name} must be a tuple of {kind.__name__} values, got {value!r}.") from None


@dataclasses.dataclass(frozen=True)
class HarnessSettings:
  """The workload both extension sweeps share (:func:`moe_edge.extensions.harness.prepare`).

  Attributes:
    model: model preset (configs/models/); checkpoint: its directory ('none' = random init).
    cluster, link_gbps: cluster preset and link bandwidth (Gbit/s).
    copies: expert memory as copies of all experts.
    method: placement method fitted on the calibration routing.
    alpha: share of a server's requests from its home domain.
    requests_per_server: held-out requests per server; calib_requests_per_server: calibration
      (train split) requests per server, for the placement and the output similarity.
    seq_len: tokens per request; seed: seed of the held-out streams (calibration: seed + 1).
    batch_rows: requests per forward pass.
    pj_per_flop, nj_per_byte: the energy model (EnergyModel).
  """
  model: str = "small_moe"
  checkpoint: str = "checkpoints/small_moe/final"
  cluster: str = "edge_hetero_4"
  link_gbps: float = 1.0
  copies: float = 1.5
  method: str = "dancemoe"
  alpha: float = 0.8
  requests_per_server: int = 16
  calib_requests_per_server: int = 8
  seq_len: int = 256
  seed: int = 0
  batch_rows: int = 16
  pj_per_flop: float = 3.0
  nj_per_byte: float = 20.0

  def __post_init__(self):
    for what, name in (("models", self.model), ("clusters", self.cluster)):
      if name not in available(what):
        raise ConfigError(f"unknown {what[:-1]} {name!r}; known: {', '.join(available(what))}.")
    for key in ("requests_per_server", "calib_requests_per_server", "seq_len", "batch_rows"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
        raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}.")
    for key in ("link_gbps", "pj_per_flop", "nj_per_byte"):
      if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
        raise ConfigError(f"{key} must be positive, got {getattr(self, key)!r}.")
    if not self.copies >= 1:
      raise ConfigError(f"copies must be >= 1 (every expert held at least once), got "
                        f"{self.copies!r}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha!r}.")

  def prepare(self) -> harness.Setup:
    """Model, cluster, placement, calibration and held-out workload of these settings."""
    return harness.prepare(self.model, self.checkpoint, self.cluster, self.link_gbps,
                           self.copies, self.method, self.alpha, self.requests_per_server,
                           self.calib_requests_per_server, self.seq_len, self.seed,
                           self.batch_rows)


def _split(cls, values: Mapping[str, Any]) -> dict:
  """``cls`` keyword arguments from one flat mapping (harness settings under ``harness``)."""
  values = dict(values)
  own = {f.name for f in dataclasses.fields(cls)} - {"harness"}
  shared = {f.name for f in dataclasses.fields(HarnessSettings)}
  unknown = sorted(set(values) - own - shared)
  if unknown:
    raise ConfigError(f"unknown settings {unknown}; known: {', '.join(sorted(own | shared))}.")
  h = {k: values.pop(k) for k in list(values) if k in shared}
  return dict(values, harness=HarnessSettings(**h))


@dataclasses.dataclass(frozen=True)
class SubstitutionSweepConfig:
  """``experiments/substitution_sweep.py`` (its module docstring says what each knob does)."""
  harness: HarnessSettings = HarnessSettings()
  thresholds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
                                   0.6, 0.8, 1.0)
  similarities: tuple[str, ...] = ("output", "response", "random")
  scaled_similarities: tuple[str, ...] = ("output",)
  tolerances: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
  drop: bool = True
  drop_renormalize: bool = False
  decode_batches: tuple[int, ...] = (1, 8)

  def __post_init__(self):
    for key, kind in (("thresholds", float), ("similarities", str),
                      ("scaled_similarities", str), ("tolerances", float),
                      ("decode_batches", int)):
      object.__setattr__(self, key, _tuple(key, getattr(self, key), kind))
    bad = sorted(set(self.similarities + self.scaled_similarities) - set(SIMILARITIES))
    if bad:
      raise ConfigError(f"unknown similarities {bad}; use {', '.join(SIMILARITIES)}.")
    if 0.0 not in self.thresholds or not self.similarities:
      raise ConfigError("thresholds must include 0 (the baseline row) and similarities must "
                        "not be empty.")
    if not self.decode_batches or min(self.decode_batches) < 1:
      raise ConfigError(f"decode_batches must be positive integers, got {self.decode_batches}.")

  @classmethod
  def from_flat(cls, values: Mapping[str, Any]) -> "SubstitutionSweepConfig":
    return cls(**_split(cls, values))


@dataclasses.dataclass(frozen=True)
class BudgetSweepConfig:
  """``experiments/budget_sweep.py`` (its module docstring says what each knob does)."""
  harness: HarnessSettings = HarnessSettings()
  kinds: tuple[str, ...] = ("latency", "energy")
  budget_units: tuple[float, ...] = (0.0, 0.1, 0.5, 1.05, 1.5, 2.1, math.inf)
  variants: tuple[str, ...] = ("force+renorm", "force+raw", "free+renorm")
  solver: str = "greedy"
  instances: int = 20000
  decode_batch: int = 1

  def __post_init__(self):
    for key, kind in (("kinds", str), ("budget_units", float), ("variants", str)):
      object.__setattr__(self, key, _tuple(key, getattr(self, key), kind))
    bad = sorted(set(self.kinds) - set(COST_KINDS))
    if bad or not self.kinds:
      raise ConfigError(f"unknown budget kinds {bad}; use {', '.join(COST_KINDS)}.")
    for v in self.variants:
      self.parse_variant(v)
    if self.solver not in SOLVERS:
      raise ConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
    if any(not b >= 0 for b in self.budget_units):
      raise ConfigError(f"budget_units must be >= 0 (inf = no budget), got {self.budget_units}.")
    for key in ("instances", "decode_batch"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
        raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}.")

  @staticmethod
  def parse_variant(v: str) -> tuple[bool, bool]:
    """``"force+renorm"`` -> ``(force_top1=True, renormalize=True)``."""
    parts = v.split("+")
    if len(parts) != 2 or parts[0] not in ("force", "free") or parts[1] not in ("renorm", "raw"):
      raise ConfigError(f"bad variant {v!r}; write force|free + renorm|raw, e.g. force+renorm.")
    return parts[0] == "force", parts[1] == "renorm"

  @classmethod
  def from_flat(cls, values: Mapping[str, Any]) -> "BudgetSweepConfig":
    return cls(**_split(cls, values))
