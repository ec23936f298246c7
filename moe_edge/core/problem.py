"""The placement problem and its solution.

Vocabulary (docs/DESIGN.md, "The problem in one page"): ``N`` servers, ``L`` MoE layers, ``E``
routed experts per layer.

* :class:`PlacementProblem` bundles the model, the cluster, each server's expert capacity and the
  per-server activation frequencies ``F [N, L, E]`` (token-choices per token) and request rates.
* :class:`Placement` holds ``hosts [N, L, E] bool`` and the tables derived from it:
  ``route [N, L, E] int32`` (the server a token on ``n`` sends expert ``(l, e)`` to; ``n`` itself
  when local) and ``slot_expert [N, L, S] int32`` (the expert in each of a server's per-layer
  slots, ``-1`` = empty, ``S`` = the largest per-layer count over servers).

Every placement method is a pure function ``method(problem, options, context) -> Placement``
(``moe_edge/placement/registry.py``). The problem carries the :class:`~moe_edge.core.hardware.
Hardware` its routes and objective are priced on (datasheet unless built with a calibration);
docs/DESIGN.md gives the vocabulary and formats.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, model_config
from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.routing import route_table
from moe_edge.core.trace import ActivationTrace


# --------------------------------------------------------------------------------------------
# Problem
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlacementProblem:
  """What a placement method sees.

  Attributes:
    model: the model config (``L = model.n_moe_layers``, ``E = model.n_experts``).
    cluster: the servers and links (``N = cluster.num_servers``).
    freq: ``[N, L, E]`` float64, token-choices of expert (l, e) per token of server n's stream
      (each [n, l, :] row sums to ``top_k``).
    tokens: ``[N]`` float64, relative request rate of each server (tokens per step); the
      traffic of (n, l, e) is ``tokens[n] * freq[n, l, e]``.
    capacity: ``[N]`` int64, routed experts each server can hold (any layers).
    hardware: the :class:`Hardware` that routes, the objective and the refinement price this
      problem with (default: the datasheet numbers of ``model`` on ``cluster``).
  """
  model: ModelConfig
  cluster: ClusterConfig
  freq: np.ndarray
  tokens: np.ndarray
  capacity: np.ndarray
  hardware: Hardware | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.hardware is None:
      object.__setattr__(self, "hardware", Hardware.build(self.model, self.cluster))
    elif self.hardware.num_servers != self.cluster.num_servers:
      raise PlacementError(f"hardware describes {self.hardware.num_servers} servers but cluster "
                           f"{self.cluster.name!r} has {self.cluster.num_servers}.")
    n, l, e = self.cluster.num_servers, self.model.n_moe_layers, self.model.n_experts
    if self.freq.shape != (n, l, e):
      raise PlacementError(
          f"activation frequencies have shape {self.freq.shape} but model {self.model.name!r} "
          f"on cluster {self.cluster.name!r} needs [N, L, E] = [{n}, {l}, {e}]; was the trace "
          f"recorded for another model or number of servers?")
    if not np.all(np.isfinite(self.freq)) or np.any(self.freq < 0):
      raise PlacementError("activation frequencies must be finite and non-negative.")
    if self.tokens.shape != (n,) or np.any(self.tokens < 0):
      raise PlacementError(f"tokens must be [N] = [{n}] non-negative rates, got "
                           f"{self.tokens.shape}.")
    if self.capacity.shape != (n,) or np.any(self.capacity < 0):
      raise PlacementError(f"capacity must be [N] = [{n}] non-negative expert counts.")
    if self.capacity.sum() < l * e:
      short = (l * e - self.capacity.sum()) * self.model.expert_bytes
      raise PlacementError(
          f"cluster {self.cluster.name!r} holds {int(self.capacity.sum())} experts but model "
          f"{self.model.name!r} has {l * e}; it falls short by {short:,.0f} bytes. Add memory "
          f"or servers.")

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.freq.shape

  @property
  def traffic(self) -> np.ndarray:
    """``[N, L, E]``: expected token-choices per step of expert (l, e) from server n."""
    return self.tokens[:, None, None] * self.freq

  @classmethod
  def build(cls, model: ModelConfig | str, cluster: ClusterConfig, freq: np.ndarray,
            tokens: np.ndarray | None = None, capacity: np.ndarray | None = None,
            calibration=None) -> "PlacementProblem":
    """Problem from frequencies; capacity from the cluster's memory unless given; the hardware
    from ``calibration`` (a ``moe_edge.cost.Calibration``; None: the datasheet)."""
    model = model_config(model)
    if capacity is None:
      cluster.check_fits(model)
      capacity = cluster.expert_capacity(model)
    freq = np.asarray(freq, dtype=np.float64)
    if tokens is None:
      tokens = np.ones(freq.shape[0])
    return cls(model, cluster, freq, np.asarray(tokens, dtype=np.float64),
               np.asarray(capacity, dtype=np.int64), Hardware.build(model, cluster, calibration))

  @classmethod
  def from_trace(cls, trace: ActivationTrace, model: ModelConfig | str, cluster: ClusterConfig,
                 capacity: np.ndarray | None = None, calibration=None) -> "PlacementProblem":
    """Problem from a recorded trace (checked against the model and cluster)."""
    model = model_config(model)
    trace.check_matches(model.n_moe_layers, model.n_experts, model.top_k,
                        cluster.num_servers)
    return cls.build(model, cluster, trace.frequency(), trace.tokens_per_server(), capacity,
                     calibration)

  def with_hardware(self, hardware: Hardware) -> "PlacementProblem":
    """The same problem priced on ``hardware`` (e.g. ``Hardware.build(model, cluster, cal)``)."""
    return dataclasses.replace(self, hardware=hardware)


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Placement:
  """Which server holds which experts, and where each server sends each expert's tokens.

  Attributes:
    hosts: ``[N, L, E]`` bool.
    route: ``[N, L, E]`` int32, destination server (``n`` itself iff hosted locally).
    slot_expert: ``[N, L, S]`` int32, expert id in each slot of server n, layer l; ``-1`` empty.
      :meth:`from_hosts` left-packs a server's experts of a layer in increasing expert id; any
      table that holds each hosted expert in exactly one slot and no other expert is valid
      (migration keeps unchanged experts in their old slots, see :func:`check_slot_table`).
    method: name of the method that made it.
    info: free-form diagnostics (timings, objective, ILP gap, ...), JSON-serialisable.
  """
  hosts: np.ndarray
  route: np.ndarray
  slot_expert: np.ndarray
  method: str = ""
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  # ---- construction ------------------------------------------------------------------------
  @classmethod
  def from_hosts(cls, hosts: np.ndarray, model: ModelConfig, cluster: ClusterConfig,
                 traffic: np.ndarray | None = None, route: np.ndarray | None = None,
                 method: str = "", info: dict | None = None, num_slots: int | None = None,
                 hardware: Hardware | None = None) -> "Placement":
    """Build the slot tables (and the default route unless given) from ``hosts``.

    The default route is :func:`~moe_edge.core.routing.route_table` on ``hardware`` (default:
    the datasheet numbers of ``model`` on ``cluster``).
    """
    hosts = np.asarray(hosts, dtype=bool)
    if route is None:
      hw = hardware if hardware is not None else Hardware.build(model, cluster)
      route = route_table(hosts, hw, traffic)
    return cls(hosts, np.asarray(route, dtype=np.int32), slot_table(hosts, num_slots),
               method, dict(info or {}))

  # ---- derived -----------------------------------------------------------------------------
  @property
  def num_servers(self) -> int:
    return self.hosts.shape[0]

  @property
  def num_slots(self) -> int:
    return self.slot_expert.shape[2]

  @property
  def expert_slot(self) -> np.ndarray:
    """``[N, L, E]`` int32: slot of expert (l, e) on server n, ``-1`` if not hosted there."""
    n, l, s = self.slot_expert.shape
    out = np.full(self.hosts.shape, -1, dtype=np.int32)
    nn, ll, ss = np.nonzero(self.slot_expert >= 0)
    out[nn, ll, self.slot_expert[nn, ll, ss]] = ss
    return out

  @property
  def experts_per_server(self) -> np.ndarray:
    """``[N]`` int: routed experts each server holds (real counts, not padded slots)."""
    return self.hosts.sum(axis=(1, 2))

  @property
  def replicas(self) -> np.ndarray:
    """``[L, E]`` int: how many servers hold each expert."""
    return self.hosts.sum(axis=0)

  # ---- checks ------------------------------------------------------------------------------
  def validate(self, problem: PlacementProblem | None = None) -> None:
    """Raise PlacementError unless the placement is consistent (and feasible for ``problem``)."""
    h = self.hosts
    if h.ndim != 3:
      raise PlacementError(f"hosts must be [N, L, E], got shape {h.shape}.")
    if self.route.shape != h.shape:
      raise PlacementError(f"route shape {self.route.shape} differs from hosts {h.shape}.")
    if problem is not None and h.shape != problem.shape:
      raise PlacementError(f"placement is [N, L, E] = {list(h.shape)} but the problem "
                           f"(model {problem.model.name!r}, cluster {problem.cluster.name!r}) "
                           f"is {list(problem.shape)}.")
    missing = np.argwhere(h.sum(axis=0) == 0)
    if missing.size:
      l, e = missing[0]
      raise PlacementError(f"{len(missing)} experts are hosted nowhere (first: layer {l}, "
                           f"expert {e}); every expert needs at least one replica.")
    n = h.shape[0]
    if np.any((self.route < 0) | (self.route >= n)):
      raise PlacementError("route table points outside [0, N).")
    nn, ll, ee = np.indices(h.shape)
    if not np.all(h[self.route, ll, ee]):
      bad = np.argwhere(~h[self.route, ll, ee])[0]
      raise PlacementError(f"route sends server {bad[0]}'s tokens for layer {bad[1]} expert "
                           f"{bad[2]} to server {self.route[tuple(bad)]}, which does not host it.")
    if np.any(h & (self.route != nn)):
      raise PlacementError("a server routes a locally hosted expert away; local choices must "
                           "stay local.")
    check_slot_table(h, self.slot_expert)
    if problem is not None:
      over = self.experts_per_server - problem.capacity
      if np.any(over > 0):
        s = int(np.argmax(over))
        raise PlacementError(
            f"server {s} ({problem.cluster.servers[s].name}) holds "
            f"{int(self.experts_per_server[s])} experts but fits {int(problem.capacity[s])}; "
            f"over by {int(over[s]) * problem.model.expert_bytes:,} bytes.")

  # ---- I/O ---------------------------------------------------------------------------------
  def to_dict(self) -> dict:
    return dict(method=self.method, info=self.info, hosts=self.hosts.astype(int).tolist(),
                route=self.route.tolist(), slot_expert=self.slot_expert.tolist())

  @classmethod
  def from_dict(cls, d: dict) -> "Placement":
    p = cls(np.asarray(d["hosts"], dtype=bool), np.asarray(d["route"], dtype=np.int32),
            np.asarray(d["slot_expert"], dtype=np.int32), d.get("method", ""),
            d.get("info", {}))
    p.validate()
    return p

  def save(self, path: str | Path) -> Path:
    """Write ``.json`` (human-readable) or ``.npz``; both round-trip exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
      path.write_text(json.dumps(self.to_dict(), default=_json_default))
    elif path.suffix == ".npz":
      np.savez_compressed(path, hosts=self.hosts, route=self.route, slot_expert=self.slot_expert,
                          method=np.array(self.method),
                          info=np.array(json.dumps(self.info, default=_json_default)))
    else:
      raise PlacementError(f"placement files end in .json or .npz, got {path.name!r}.")
    return path

  @classmethod
  def load(cls, path: str | Path) -> "Placement":
    path = Path(path)
    if not path.is_file():
      raise PlacementError(f"no placement file at {path}; make one with experiments/place.py.")
    if path.suffix == ".json":
      return cls.from_dict(json.loads(path.read_text()))
    with np.load(path, allow_pickle=False) as z:
      d = dict(hosts=z["hosts"], route=z["route"], slot_expert=z["slot_expert"],
               method=str(z["method"]), info=json.loads(str(z["info"])))
    return cls.from_dict(d)

  def __eq__(self, other):
    return (isinstance(other, Placement) and np.array_equal(self.hosts, other.hosts)
            and np.array_equal(self.route, other.route)
            and np.array_equal(self.slot_expert, other.slot_expert))


def slot_table(hosts: np.ndarray, num_slots: int | None = None) -> np.ndarray:
  """``[N, L, S]`` int32: left-packed expert ids of each server's layer, ``-1`` padded.

  ``S`` is the largest per-(server, layer) count unless ``num_slots`` (>= that) is given.
  """
  hosts = np.asarray(hosts, dtype=bool)
  n, l, e = hosts.shape
  need = int(hosts.sum(axis=2).max()) if hosts.size else 0
  s = need if num_slots is None else int(num_slots)
  if s < need:
    raise PlacementError(f"num_slots={s} is smaller than the {need} experts a server holds in "
                         f"one layer.")
  # Sort key puts hosted experts first in increasing id order.
  key = np.where(hosts, np.arange(e)[None, None, :], e + np.arange(e)[None, None, :])
  order = np.argsort(key, axis=2, kind="stable")[..., :s] if s <= e else np.argsort(
      key, axis=2, kind="stable")
  ok = np.take_along_axis(hosts, order, axis=2)
  out = np.where(ok, order, -1).astype(np.int32)
  if s > e:
    out = np.concatenate([out, np.full((n, l, s - e), -1, np.int32)], axis=2)
  return out


def check_slot_table(hosts: np.ndarray, slot_expert: np.ndarray) -> None:
  """Raise PlacementError unless ``slot_expert [N, L, S]`` is consistent with ``hosts [N, L, E]``:
  each hosted expert sits in exactly one slot of its (server, layer) and no other expert does."""
  h, s = np.asarray(hosts, dtype=bool), np.asarray(slot_expert)
  n, l, e = h.shape
  if s.ndim != 3 or s.shape[:2] != (n, l):
    raise PlacementError(f"slot tables must be [N, L, S] with [N, L] = [{n}, {l}], got shape "
                         f"{s.shape}; rebuild with Placement.from_hosts.")
  if np.any((s < -1) | (s >= e)):
    raise PlacementError(f"slot tables hold expert ids outside [-1, {e}).")
  occupied = np.zeros(h.shape, dtype=np.int64)
  nn, ll, ss = np.nonzero(s >= 0)
  np.add.at(occupied, (nn, ll, s[nn, ll, ss]), 1)
  if not np.array_equal(occupied, h.astype(np.int64)):
    bad = tuple(int(x) for x in np.argwhere(occupied != h)[0])
    raise PlacementError(
        f"slot tables do not match hosts: server {bad[0]}, layer {bad[1]}, expert {bad[2]} "
        f"is hosted {int(h[bad])} time(s) but sits in {int(occupied[bad])} slot(s); rebuild "
        f"with Placement.from_hosts (or migration.assign_slots_stable).")


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON-serialisable: {type(o)}")
