"""Drifting workloads for migration replays: the drift presets and a trace sampled under them.

A preset changes the servers' home domains twice, at ``~steps/3`` and ``~2 steps/3`` (aligned to
the interval), starting from the default homes (server ``i`` at domain ``i``):

* ``pairs``: servers 0 and 1 swap homes at the first change, servers 2 and 3 at the second
  (with fewer than four servers the second change swaps 0 and 1 back);
* ``mix``: the same pairs instead both serve an even mix of their two homes;
* ``all``: every pair of neighbours swaps at the first change, all homes rotate by one at the
  second.
"""
from __future__ import annotations

from moe_edge.config import ConfigError
from moe_edge.workload.stats_traces import sample_stats_trace
from moe_edge.workload.streams import DriftSchedule, default_homes
from moe_edge.workload.traces import ActivationTrace

DRIFT_PRESETS = ("pairs", "mix", "all")


def _change_steps(steps: int, interval: int) -> list[int]:
  return [max(1, round(steps * f / 3 / interval)) * interval for f in (1, 2)]


def drift_preset(preset: str, num_servers: int, steps: int, interval: int) -> DriftSchedule:
  """The home changes of ``preset`` (module docstring) for ``num_servers`` servers."""
  if preset not in DRIFT_PRESETS:
    raise ConfigError(f"unknown drift preset {preset!r}; known: {', '.join(DRIFT_PRESETS)}.")
  if num_servers < 2:
    raise ConfigError(f"drift preset {preset!r} needs at least two servers, got {num_servers}.")
  homes = list(default_homes(num_servers))
  at = _change_steps(steps, interval)
  if preset in ("pairs", "mix"):

    def change(cur, a, b):
      out = list(cur)
      if preset == "pairs":
        out[a], out[b] = cur[b], cur[a]
      else:
        out[a] = out[b] = {homes[a]: 0.5, homes[b]: 0.5}
      return out

    first = change(homes, 0, 1)
    second = change(first, *((2, 3) if num_servers >= 4 else (0, 1)))
    return DriftSchedule(((at[0], tuple(first)), (at[1], tuple(second))))
  swapped = list(homes)
  for i in range(0, num_servers - 1, 2):
    swapped[i], swapped[i + 1] = homes[i + 1], homes[i]
  rotated = homes[1:] + homes[:1]
  return DriftSchedule(((at[0], tuple(swapped)), (at[1], tuple(rotated))))


def drifting_trace(model: str, num_servers: int, steps: int, request_len: int, alpha: float,
                   seed: int, drift: DriftSchedule) -> ActivationTrace:
  """``steps`` requests of ``request_len`` tokens per server sampled from the real routing
  statistics of ``model`` (:func:`~moe_edge.workload.stats_traces.sample_stats_trace`), homes
  changing as ``drift`` says; trace step ``s`` = each server's ``s``-th request."""
  return sample_stats_trace(model, num_servers, steps * request_len, alpha, seed, drift=drift,
                            request_len=request_len)
