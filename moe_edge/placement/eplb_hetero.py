"""DeepSeek EPLB re-implemented for heterogeneous hardware (the paper's "EPLB for heterogeneous
hardware" baseline, ``docs/PAPER.md``): EPLB's replicate-then-pack (``eplb.py``, after
github.com/deepseek-ai/EPLB), with each server's slots from its own memory and the packing
weighted by its speed.

Per layer (EPLB's global policy; loads ``w[e] = sum_n T[n, l, e]``):

1. **Slots** from memory: server n gets ``slots[l, n]`` physical experts in layer l
   (``eplb.layer_slots``: its whole capacity spread over the layers, at most ``E``), so a
   larger server holds more copies (homogeneous EPLB gives every GPU the same count).
2. **Replicate** (EPLB unchanged): each extra physical slot goes to the expert with the largest
   load per replica so far (ties to the lower id).
3. **Pack, speed-weighted**: physical experts (load ``w / replicas``), heaviest first, each go to
   the server whose finishing time ``(packed load + this load) * t[n]`` is least among servers
   with a slot left (``t[n]``: seconds per token of one expert on server n; ties to the lower
   id), so a faster server takes more load. EPLB packs to equal load; this packs to equal time.
4. Two replicas of one expert packed onto one server collapse into one copy (``info``
   counts them). **Routing**: nearest replica.

``t`` is the cost model's expert FLOP time per token (``speed="flops"``, what prefill and large
batches are bound by) or its weight-read time per expert (``speed="bandwidth"``, what decode is
bound by), from ``context.cost``'s hardware when given, else the problem's.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish
from moe_edge.placement.eplb import layer_slots, replicate_experts
from moe_edge.placement.registry import PlacementContext, register

SPEEDS = ("flops", "bandwidth")


@dataclasses.dataclass(frozen=True)
class EplbHeteroOptions:
  """Options of :func:`eplb_hetero`.

  Attributes:
    speed: what a server's speed is: ``"flops"`` (expert compute per token) or
      ``"bandwidth"`` (expert weight read).
    route_slack: the nearest-replica route's tie slack (relative).
  """
  speed: str = "flops"
  route_slack: float = 0.1

  def __post_init__(self):
    if self.speed not in SPEEDS:
      raise PlacementError(f"eplb_hetero: speed={self.speed!r}; choose one of {SPEEDS}.")
    if not self.route_slack >= 0:
      raise PlacementError(f"eplb_hetero: route_slack={self.route_slack} must be >= 0.")


def pack_by_time(load: np.ndarray, slots: np.ndarray, sec: np.ndarray) -> np.ndarray:
  """``[K]`` server of each item: heaviest first to the least finishing time (step 3).

  Args:
    load: ``[K]`` item loads.
    slots: ``[N]`` items per server (sum ``K``).
    sec: ``[N]`` seconds per unit of load on each server.
  """
  if int(slots.sum()) != load.size:
    raise PlacementError(f"eplb_hetero: {load.size} physical experts for {int(slots.sum())} "
                         f"slots.")
  left = np.asarray(slots, dtype=np.int64).copy()
  packed = np.zeros(slots.size)
  out = np.empty(load.size, dtype=np.int64)
  for k in np.argsort(-load, kind="stable"):
    s = int(np.argmin(np.where(left > 0, (packed + load[k]) * sec, np.inf)))
    out[k] = s
    packed[s] += load[k]
    left[s] -= 1
  return out


def server_seconds(problem: PlacementProblem, speed: str, cost=None) -> np.ndarray:
  """``[N]`` the per-server time that weighs the packing (module docstring): from the cost
  model's hardware when given, else the problem's."""
  hw = cost.hardware if cost is not None else problem.hardware
  return np.asarray(hw.expert_flop if speed == "flops" else hw.expert_read, dtype=np.float64)


@register("eplb_hetero", "baseline", EplbHeteroOptions, label="EPLB-hetero")
def eplb_hetero(problem: PlacementProblem, options: EplbHeteroOptions = EplbHeteroOptions(),
                context: PlacementContext = PlacementContext()) -> Placement:
  """EPLB with memory-proportional slots and speed-weighted packing (module docstring)."""
  start = time.perf_counter()
  n, l, e = problem.shape
  slots = layer_slots(problem.capacity, l, e)
  if slots.sum(axis=1).min() < e:
    raise PlacementError(f"eplb_hetero: with capacity {problem.capacity.tolist()} some layer "
                         f"gets only {int(slots.sum(axis=1).min())} slots for E={e} experts; "
                         f"add memory.")
  sec = server_seconds(problem, options.speed, context.cost)
  weight = problem.traffic.sum(axis=0)
  hosts = np.zeros((n, l, e), dtype=bool)
  physical = 0
  for li in range(l):
    phy2log, _, cnt = replicate_experts(weight[li:li + 1], int(slots[li].sum()))
    load = weight[li, phy2log[0]] / cnt[0, phy2log[0]]
    hosts[pack_by_time(load, slots[li], sec), li, phy2log[0]] = True
    physical += phy2log.shape[1]
  info = dict(speed=options.speed, num_replicas=physical, collapsed=int(physical - hosts.sum()))
  return finish(problem, hosts, "eplb_hetero", start, info, slack=options.route_slack)
