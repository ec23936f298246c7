"""DeepSeek's Expert Parallelism Load Balancer (EPLB), re-implemented in numpy from its
published description (github.com/deepseek-ai/EPLB, README), and its use as a placement baseline.

EPLB balances *compute load* across GPUs and ignores where tokens come from. Given the load of
every logical expert of every layer it

1. (hierarchical policy, used when the number of nodes divides the number of expert groups)
   packs expert groups onto nodes so node loads are balanced,
2. replicates experts inside each node: each extra physical slot goes to the logical expert with
   the largest load per replica so far,
3. packs the physical experts (load = logical load / replica count) onto the node's GPUs so
   GPU loads are balanced, every GPU getting the same number of slots.

Otherwise the *global* policy runs the same steps with one group and one node. Both packing
steps are the greedy "heaviest item first, into the lightest pack that still has room".

Tie-breaking (needed to reproduce the README example exactly): items are taken heaviest first
with equal weights in increasing index order (stable sort); equal pack loads go to the lowest
pack index; equal load-per-replica goes to the lowest expert index.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish
from moe_edge.placement.registry import PlacementContext, register


def balanced_packing(weight: np.ndarray, num_packs: int,
                     pack_size: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pack items into packs of fixed sizes, balancing the packs' total weight.

  Args:
    weight: ``[X, n]`` item weights (one independent problem per row).
    num_packs: number of packs.
    pack_size: ``[num_packs]`` items per pack (default: ``n / num_packs`` each, EPLB's case).
  Returns:
    ``pack_index [X, n]`` and ``rank_in_pack [X, n]`` (int64).
  """
  x, n = weight.shape
  if pack_size is None:
    if n % num_packs:
      raise PlacementError(f"EPLB packing: {n} items do not split evenly into {num_packs} packs.")
    pack_size = np.full(num_packs, n // num_packs, dtype=np.int64)
  pack_size = np.asarray(pack_size, dtype=np.int64)
  if pack_size.sum() != n:
    raise PlacementError(f"EPLB packing: pack sizes sum to {pack_size.sum()}, not {n} items.")
  pack_index = np.empty((x, n), dtype=np.int64)
  rank_in_pack = np.empty((x, n), dtype=np.int64)
  if np.all(pack_size == 1):
    pack_index[:] = np.arange(n)
    rank_in_pack[:] = 0
    return pack_index, rank_in_pack
  for row in range(x):
    load = np.zeros(num_packs)
    items = np.zeros(num_packs, dtype=np.int64)
    for i in np.argsort(-weight[row], kind="stable"):
      p = int(np.argmin(np.where(items < pack_size, load, np.inf)))
      pack_index[row, i] = p
      rank_in_pack[row, i] = items[p]
      load[p] += weight[row, i]
      items[p] += 1
  return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray,
                      num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Give ``num_phy - num_log`` extra replicas, each to the expert with the most load per replica.

  Args:
    weight: ``[X, num_log]`` logical expert loads.
  Returns:
    ``phy2log [X, num_phy]`` (logical expert of each physical one; the first ``num_log`` are the
    identity), ``rank [X, num_phy]`` (replica index of each physical expert) and
    ``logcnt [X, num_log]`` (replicas per logical expert).
  """
  x, num_log = weight.shape
  if num_phy < num_log:
    raise PlacementError(f"EPLB: {num_phy} physical slots cannot hold {num_log} experts.")
  rows = np.arange(x)
  phy2log = np.zeros((x, num_phy), dtype=np.int64)
  phy2log[:, :num_log] = np.arange(num_log)
  rank = np.zeros((x, num_phy), dtype=np.int64)
  logcnt = np.ones((x, num_log), dtype=np.int64)
  for i in range(num_log, num_phy):
    best = np.argmax(weight / logcnt, axis=1)
    phy2log[:, i] = best
    rank[:, i] = logcnt[rows, best]
    logcnt[rows, best] += 1
  return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
  """Row-wise inverse of permutations ``[X, n]``."""
  inv = np.empty_like(perm)
  np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
  return inv


def _hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Groups -> nodes, replicate inside nodes, physical experts -> GPUs (module docstring)."""
  num_layers, num_log = weight.shape
  group_size = num_log // num_groups
  groups_per_node = num_groups // num_nodes
  log_per_node = num_log // num_nodes
  phy_per_gpu = num_phy // num_gpus

  # 1. Expert groups to nodes; relabel experts node-major ("mlog": expert ids inside nodes).
  group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
  group_pack, group_rank = balanced_packing(group_load, num_nodes)
  first = (group_pack * groups_per_node + group_rank) * group_size  # [L, groups]
  log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(num_layers, num_log)
  mlog2log = _inverse(log2mlog)

  # 2. Replicate inside each node (one row per (layer, node)).
  mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
  phy2mlog, phy_rank, mlog_cnt = replicate_experts(mlog_load, num_phy // num_nodes)

  # 3. Physical experts of each node to its GPUs, balancing load per replica.
  phy_load = np.take_along_axis(mlog_load / mlog_cnt, phy2mlog, axis=1)
  pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
  pphy2phy = _inverse(pack * phy_per_gpu + rank)
  pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
  pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1)
               + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(num_layers, -1)
  pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
  pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(num_layers, -1)
  logcnt = np.take_along_axis(mlog_cnt.reshape(num_layers, -1), log2mlog, axis=1)
  return pphy2log, pphy_rank, logcnt


def _log2phy(phy2log: np.ndarray, rank: np.ndarray, num_log: int) -> np.ndarray:
  """``[L, num_log, max_replicas]`` physical ids of each logical expert, ``-1`` padded."""
  num_layers, num_phy = phy2log.shape
  out = np.full((num_layers, num_log, num_phy - num_log + 1), -1, dtype=np.int64)
  layer = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
  out[layer, phy2log, rank] = np.broadcast_to(np.arange(num_phy), phy2log.shape)
  return out


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """EPLB's entry point: a replication and placement plan from expert loads.

  Args:
    weight: ``[L, E]`` load of every logical expert of every layer.
    num_replicas: physical experts per layer (a multiple of ``num_gpus``, at least ``E``).
    num_groups: expert groups (``E`` must be a multiple); hierarchical policy when
      ``num_nodes`` divides it, global policy otherwise.
    num_nodes: server nodes (``num_gpus`` must be a multiple under the hierarchical policy).
    num_gpus: GPUs in all; GPU ``g`` holds physical experts
      ``[g * num_replicas / num_gpus, (g + 1) * num_replicas / num_gpus)``.
  Returns:
    ``phy2log [L, num_replicas]`` logical expert of each physical slot,
    ``log2phy [L, E, num_replicas - E + 1]`` physical slots of each logical expert (-1 padded),
    ``logcnt [L, E]`` replicas per logical expert.
  """
  weight = np.asarray(weight, dtype=np.float64)
  if weight.ndim != 2:
    raise PlacementError(f"EPLB weight must be [layers, experts], got shape {weight.shape}.")
  if not np.all(np.isfinite(weight)) or np.any(weight < 0):
    raise PlacementError("EPLB weight must be finite and non-negative.")
  num_log = weight.shape[1]
  checks = [(num_replicas >= num_log, f"num_replicas={num_replicas} must be >= the {num_log} "
             f"experts"),
            (num_gpus > 0 and num_replicas % num_gpus == 0,
             f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}"),
            (num_groups > 0 and num_log % num_groups == 0,
             f"the {num_log} experts must split evenly into num_groups={num_groups}"),
            (num_nodes > 0, f"num_nodes={num_nodes} must be positive")]
  hierarchical = num_groups % num_nodes == 0
  if hierarchical:
    checks.append((num_gpus % num_nodes == 0,
                   f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes} (the "
                   f"hierarchical policy, used since num_nodes divides num_groups)"))
  for ok, msg in checks:
    if not ok:
      raise PlacementError(f"EPLB: {msg}.")
  if hierarchical:
    phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
  else:
    phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
  return phy2log, _log2phy(phy2log, rank, num_log), logcnt


def rebalance_experts_uneven(weight: np.ndarray,
                             slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """EPLB's global policy with ``slots[g]`` physical experts on GPU g (unequal memory).

  Same replicate-then-pack steps; the packing fills GPU g with exactly ``slots[g]`` physical
  experts. Returns ``phy2log``, ``log2phy``, ``logcnt`` as :func:`rebalance_experts`, GPU g
  holding the physical slots ``[cumsum(slots)[g] - slots[g], cumsum(slots)[g])``.
  """
  weight = np.asarray(weight, dtype=np.float64)
  slots = np.asarray(slots, dtype=np.int64)
  num_layers, num_log = weight.shape
  num_phy = int(slots.sum())
  phy2mlog, phy_rank, logcnt = replicate_experts(weight, num_phy)
  phy_load = np.take_along_axis(weight / logcnt, phy2mlog, axis=1)
  pack, rank = balanced_packing(phy_load, len(slots), slots)
  offset = np.concatenate([[0], np.cumsum(slots)[:-1]])
  pphy2phy = _inverse(offset[pack] + rank)
  phy2log = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
  pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1)
  return phy2log, _log2phy(phy2log, pphy_rank, num_log), logcnt


def layer_slots(capacity: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
  """``[L, N]`` slots of each server in each layer when memory is unequal.

  Server n gets ``floor(capacity[n] / L)`` slots in every layer and one more in
  ``capacity[n] mod L`` layers, taken cyclically where the previous server stopped, so layer
  totals differ by at most one (each at least ``floor(sum(capacity) / L)``); at most ``E``.
  """
  capacity = np.asarray(capacity, dtype=np.int64)
  base = np.broadcast_to(capacity // num_layers, (num_layers, capacity.size)).copy()
  start = np.concatenate([[0], np.cumsum(capacity % num_layers)[:-1]])
  layers = np.arange(num_layers)[:, None]
  base += (layers - start[None, :]) % num_layers < (capacity % num_layers)[None, :]
  return np.minimum(base, num_experts)


@dataclasses.dataclass(frozen=True)
class EplbOptions:
  """Options of :func:`eplb`: EPLB's ``num_groups`` and ``num_nodes`` (hierarchical packing)
  and a cap on the slots per layer and server (None: no cap)."""
  num_groups: int = 1
  num_nodes: int = 1
  max_slots_per_layer: int | None = None


@register("eplb", "baseline", EplbOptions)
def eplb(problem: PlacementProblem, options: EplbOptions = EplbOptions(),
         context: PlacementContext = PlacementContext()) -> Placement:
  """EPLB as a placement baseline: balance compute load, no locality.

  Mapping: the load of expert (l, e) is its total traffic ``sum_n T[n, l, e]``; every server is
  one EPLB "GPU". EPLB gives every GPU the same number of slots per layer, so each server gets
  ``s = min_n floor(capacity[n] / L)`` slots per layer (capped at ``E`` and at
  ``max_slots_per_layer``), i.e. ``num_replicas = s * N`` physical experts per layer; the extra
  memory of larger servers stays unused. When ``s * N < E`` (the smallest server is too small for
  equal slots to cover every expert) each server gets its own slots per layer instead
  (:func:`layer_slots`: its whole memory, spread over the layers) and EPLB's global policy packs
  each layer into these unequal GPUs (:func:`rebalance_experts_uneven`); ``info["slots"]`` says
  which. Two replicas of one expert packed onto the same server collapse into one hosted copy.
  Routing: nearest replica. ``context.seed`` is unused (deterministic).
  """
  num_groups, num_nodes = options.num_groups, options.num_nodes
  max_slots_per_layer = options.max_slots_per_layer
  start = time.perf_counter()
  n, l, e = problem.shape
  weight = problem.traffic.sum(axis=0)
  s = int(np.minimum(problem.capacity // l, e).min())
  if max_slots_per_layer is not None:
    s = min(s, int(max_slots_per_layer))
  hosts = np.zeros((n, l, e), dtype=bool)
  if s * n >= e:
    phy2log, _, _ = rebalance_experts(weight, s * n, num_groups, num_nodes, n)
    server = np.repeat(np.arange(n), s)
    hosts[np.broadcast_to(server, phy2log.shape), np.arange(l)[:, None], phy2log] = True
    mode, replicas = f"equal: {s} per server per layer", int(phy2log.size)
  else:
    slots = layer_slots(problem.capacity, l, e)
    if max_slots_per_layer is not None:
      slots = np.minimum(slots, int(max_slots_per_layer))
    if slots.sum(axis=1).min() < e:
      raise PlacementError(
          f"eplb: with capacity {problem.capacity.tolist()} (max_slots_per_layer="
          f"{max_slots_per_layer}) some layer gets only {int(slots.sum(axis=1).min())} slots "
          f"per layer for E={e} experts. Raise max_slots_per_layer or add memory.")
    for li in range(l):
      phy2log, _, _ = rebalance_experts_uneven(weight[li:li + 1], slots[li])
      hosts[np.repeat(np.arange(n), slots[li]), li, phy2log[0]] = True
    mode = (f"uneven (equal slots would give {s} * {n} < E={e}): {slots.tolist()} per layer "
            f"and server")
    replicas = int(slots.sum())
  info = dict(seed=context.seed, slots=mode, num_replicas=replicas, num_groups=num_groups,
              num_nodes=num_nodes, collapsed=int(replicas - hosts.sum()))
  return finish(problem, hosts, "eplb", start, info)
