"""The placement-method registry: one decorator adds a method everywhere (docs/DESIGN.md,
"Adding a placement method").

A method is a pure function ``fn(problem, options, context) -> Placement`` registered with
``@register(name, role, options=OptionsType)``:

* ``problem``: the :class:`~moe_edge.core.problem.PlacementProblem` (frequencies, capacity and
  the :class:`~moe_edge.core.hardware.Hardware` its costs are priced on);
* ``options``: an instance of the method's own frozen dataclass (``NoOptions`` when it has none);
* ``context``: what a deployment knows beyond the profile (:class:`PlacementContext`: the seed,
  the :class:`~moe_edge.cost.model.CostModel`, a :class:`WorkloadSummary`).

``role`` is one of :data:`ROLES`: ``ours`` (this project's methods, the tables' headline),
``paper`` (the paper's published algorithm), ``baseline`` (honest comparisons), ``oracle``
(exact optima on small instances). Tables, ablations, sweeps, plots and configs list methods
with :func:`names` (optionally by role), in registration order, so a method registered in one
file appears in all of them. ``moe_edge/placement/__init__.py`` imports every method module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost.model import CostModel

ROLES = ("ours", "paper", "baseline", "oracle")


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a method that has none."""


@dataclasses.dataclass(frozen=True)
class WorkloadSummary:
  """What the serving scheduler forms, per server (all ``[N]`` float64, means over requests).

  Attributes:
    request_rate: requests per second arriving at each server.
    prompt_tokens: prompt length.
    output_tokens: output length.
    decode_batch: concurrent decoding requests in one decode step.
    prefill_tokens: tokens in one prefill step.
  """
  request_rate: np.ndarray
  prompt_tokens: np.ndarray
  output_tokens: np.ndarray
  decode_batch: np.ndarray
  prefill_tokens: np.ndarray

  def __post_init__(self):
    shapes = {f.name: np.shape(getattr(self, f.name)) for f in dataclasses.fields(self)}
    n = shapes["request_rate"]
    for name, shape in shapes.items():
      a = np.asarray(getattr(self, name), dtype=np.float64)
      if shape != n or len(shape) != 1 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise PlacementError(f"WorkloadSummary.{name} must be [N] finite non-negative numbers "
                             f"like request_rate {n}, got shape {shape}.")
      object.__setattr__(self, name, a)

  @property
  def num_servers(self) -> int:
    return int(self.request_rate.shape[0])


@dataclasses.dataclass(frozen=True)
class PlacementContext:
  """What a deployment knows besides the profile.

  Attributes:
    seed: randomness of randomised methods (deterministic methods ignore it).
    cost: the cost model of the deployment (latency-driven methods need it).
    workload: per-server request rates and the batches the scheduler forms.
    judge: ``judge(placement) -> seconds``, the mean request latency of a short simulation of
      the deployment on *profiling* requests (not the evaluation's); methods that end with a
      choice among candidates may use it (``latency_search``: ``SearchOptions.judge_final``).
      None: no simulation is available and methods choose on the cost model alone.
  """
  seed: int = 0
  cost: CostModel | None = None
  workload: WorkloadSummary | None = None
  judge: Callable[[Placement], float] | None = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered method: ``fn(problem, options, context) -> Placement``."""
  name: str
  role: str
  fn: Callable[[PlacementProblem, Any, PlacementContext], Placement]
  options_type: type
  doc: str
  label: str = ""

  @property
  def display(self) -> str:
    """The name tables and plots print (``label``, else the method name)."""
    return self.label or self.name


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, role: str, options: type = NoOptions, label: str = ""):
  """Decorator: register ``fn(problem, options, context) -> Placement`` as method ``name``
  (``label``: the name the tables' headline prints, default ``name``)."""
  if role not in ROLES:
    raise PlacementError(f"role {role!r} of method {name!r} is not one of {', '.join(ROLES)}.")
  if not (dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen):
    raise PlacementError(f"options of method {name!r} must be a frozen dataclass type, got "
                         f"{options!r}.")

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise PlacementError(f"placement method {name!r} is registered twice "
                           f"({_REGISTRY[name].fn.__module__} and {fn.__module__}); pick "
                           f"another name.")
    doc = (fn.__doc__ or "").strip().split("\n")[0]
    _REGISTRY[name] = MethodSpec(name, role, fn, options, doc, label)
    return fn
  return wrap


def unregister(name: str) -> None:
  """Remove method ``name`` (tests that register a toy method clean up with this)."""
  _REGISTRY.pop(name, None)


def get(name: str) -> MethodSpec:
  """The spec of method ``name``; unknown names list the known ones."""
  if name not in _REGISTRY:
    raise PlacementError(f"unknown placement method {name!r}; known methods: "
                         f"{', '.join(_REGISTRY)}.")
  return _REGISTRY[name]


def names(role: str | None = None) -> list[str]:
  """Registered method names in registration order, all or those of ``role``."""
  if role is not None and role not in ROLES:
    raise PlacementError(f"role {role!r} is not one of {', '.join(ROLES)}.")
  return [n for n, s in _REGISTRY.items() if role is None or s.role == role]


def role(name: str) -> str:
  """The role of method ``name``."""
  return get(name).role


def make_options(name: str, options: Any = None):
  """``options`` as method ``name``'s options dataclass: None gives the defaults, a mapping is
  checked field by field (an unknown key names the known ones), an instance passes through."""
  spec = get(name)
  if options is None:
    return spec.options_type()
  if isinstance(options, spec.options_type):
    return options
  if not isinstance(options, Mapping):
    raise PlacementError(f"options of {name!r} must be a {spec.options_type.__name__} or a "
                         f"mapping, got {type(options).__name__}.")
  known = {f.name for f in dataclasses.fields(spec.options_type)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise PlacementError(f"method {name!r} has no option(s) {unknown}; its options "
                         f"({spec.options_type.__name__}) are {sorted(known) or 'none'}.")
  return spec.options_type(**options)


def place(name: str, problem: PlacementProblem, options: Any = None,
          context: PlacementContext | None = None) -> Placement:
  """Run method ``name`` on ``problem`` (options as :func:`make_options` accepts them)."""
  spec = get(name)
  opts = make_options(name, options)
  return spec.fn(problem, opts, context if context is not None else PlacementContext())


def option_fields(name: str) -> dict[str, Any]:
  """``{option: default}`` of method ``name`` (for listings and config files)."""
  return {f.name: f.default for f in dataclasses.fields(get(name).options_type)}
