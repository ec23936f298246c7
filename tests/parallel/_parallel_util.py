"""Shared helpers of the tests/parallel tests: placements, routing and a plain numpy reference.

Every placement is built with ``num_slots = E`` unless a test says otherwise, so the jitted
layer compiles once for the whole sweep (the tables are arguments, not constants).
"""
from __future__ import annotations

import numpy as np

from moe_edge.config import cluster_config, model_config
from moe_edge.placement.problem import Placement
from moe_edge.workload.traces import ActivationTrace

MODEL = model_config("tiny")
L, E, D, F, K = (MODEL.n_moe_layers, MODEL.n_experts, MODEL.d_model, MODEL.d_ff_expert,
                 MODEL.top_k)


def cluster(n: int):
  return cluster_config("homogeneous_4", num_servers=n)


# ---- reference -----------------------------------------------------------------------------
def numpy_moe(x, ids, gates, wg, wu, wd) -> np.ndarray:
  """``sum_r gates[t, r] * down(silu(x_t @ gate_e) * (x_t @ up_e))`` by loops, in float64."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  out = np.zeros(x.shape, np.float64)
  for t in range(x.shape[0]):
    for r in range(ids.shape[1]):
      e = int(ids[t, r])
      a, b = x[t] @ wg[e], x[t] @ wu[e]
      out[t] += float(gates[t, r]) * ((a / (1.0 + np.exp(-a)) * b) @ wd[e])
  return out


def numpy_send_counts(route, layer, ids, mask, n) -> np.ndarray:
  """``[N, N]`` remote token-choices ``[src, dst]`` counted one by one."""
  t = ids.shape[0] // n
  out = np.zeros((n, n), np.int64)
  for row in range(ids.shape[0]):
    if not mask[row]:
      continue
    src = row // t
    for e in ids[row]:
      dst = route[src, layer, e]
      if dst != src:
        out[src, dst] += 1
  return out


def weights(rng, scale: float = 0.3) -> dict[str, np.ndarray]:
  return dict(w_gate=rng.normal(0, scale, (L, E, D, F)).astype(np.float32),
              w_up=rng.normal(0, scale, (L, E, D, F)).astype(np.float32),
              w_down=rng.normal(0, scale, (L, E, F, D)).astype(np.float32))


# ---- placements ----------------------------------------------------------------------------
def cover(hosts: np.ndarray, rng) -> np.ndarray:
  """Give every expert without a replica one on a random server."""
  n = hosts.shape[0]
  for l, e in np.argwhere(~hosts.any(axis=0)):
    hosts[rng.integers(n), l, e] = True
  return hosts


def random_route(hosts: np.ndarray, rng) -> np.ndarray:
  """Local when hosted, else a uniformly random replica (not the default nearest one)."""
  route = np.empty(hosts.shape, np.int32)
  for s, l, e in np.ndindex(hosts.shape):
    route[s, l, e] = s if hosts[s, l, e] else rng.choice(np.flatnonzero(hosts[:, l, e]))
  return route


def make_placement(hosts, n, route=None, num_slots=E) -> Placement:
  return Placement.from_hosts(hosts, MODEL, cluster(n), route=route, num_slots=num_slots)


def scenario(name: str, n: int, rng) -> Placement:
  """A placement of one kind (see the names below) for ``n`` servers of the tiny model."""
  if name == "replicas":  # random, many replicas, default nearest-replica route
    return make_placement(cover(rng.random((n, L, E)) < 0.4, rng), n)
  if name == "random_route":  # replicas, route picks any replica
    hosts = cover(rng.random((n, L, E)) < 0.3, rng)
    return make_placement(hosts, n, route=random_route(hosts, rng))
  if name == "all_local":  # every server hosts everything
    return make_placement(np.ones((n, L, E), bool), n)
  if name == "expert_parallel":  # round robin, no replicas
    hosts = np.zeros((n, L, E), bool)
    for l in range(L):
      hosts[(np.arange(E) + l) % n, l, np.arange(E)] = True
    return make_placement(hosts, n)
  if name == "uneven":  # server 0 holds nothing in layer 0, server 1 everything in layer 1
    hosts = rng.random((n, L, E)) < 0.25
    hosts[0, 0] = False
    hosts[1, 1] = True
    return make_placement(cover(hosts, rng), n)
  raise ValueError(name)


SCENARIOS = ("replicas", "random_route", "all_local", "expert_parallel", "uneven")


# ---- routing -------------------------------------------------------------------------------
def random_routing(rng, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """``expert_ids [rows, L, k]`` (distinct per token and layer), ``gates [rows, L, k]``."""
  ids = np.argsort(rng.random((rows, L, E)), axis=-1)[..., :K].astype(np.int32)
  gates = rng.random((rows, L, K)).astype(np.float32)
  return ids, gates


def remote_only_routing(rng, hosts: np.ndarray, t: int) -> np.ndarray:
  """``[N*t, L, k]`` ids where every token picks only experts its server does not host."""
  n = hosts.shape[0]
  ids = np.zeros((n * t, L, K), np.int32)
  for row in range(n * t):
    for l in range(L):
      away = np.flatnonzero(~hosts[row // t, l])
      ids[row, l] = rng.choice(away, K, replace=away.size < K)
  return ids


def trace_of(ids: np.ndarray, gates: np.ndarray, mask: np.ndarray, n: int) -> ActivationTrace:
  """The valid rows of a packed batch as an ActivationTrace (server = row // T)."""
  t = ids.shape[0] // n
  rows = np.flatnonzero(mask)
  return ActivationTrace(
      expert_ids=ids[rows].astype(np.int32), gate_weights=gates[rows].astype(np.float32),
      server=(rows // t).astype(np.int32), request=rows.astype(np.int32),
      position=np.zeros(rows.size, np.int32), step=np.zeros(rows.size, np.int32),
      model=MODEL.name, num_experts=E, num_servers=n)
