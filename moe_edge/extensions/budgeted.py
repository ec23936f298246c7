r"""Budgeted expert selection (MoE^2 style): which top-k choices to run, and where, per token.

After Jin et al., "MoE^2: Optimizing Collaborative Inference for Edge Large Language Models"
(arXiv:2501.09410), which selects experts per token under energy and latency constraints.

**Problem.** A token on server ``n`` picked ``k`` experts with gates ``g_r``. Each choice ``r`` is
either dropped (cost 0, value 0) or run on one replica ``m`` among the servers holding expert
``e_r`` (value ``g_r``, cost ``C[n, m]``, see :func:`choice_cost_matrix`). Maximise the kept gate
mass ``sum_r g_r [r kept]`` subject to ``sum_r cost_r <= budget`` (per token and MoE layer). This
is a multiple-choice knapsack (one group per choice: drop or one of its replicas). All replicas of
a choice have the same value, so replacing any replica by the cheapest holder keeps the value and
does not raise the cost: some optimum uses only cheapest holders, and the problem reduces to a
0/1 knapsack over ``k`` items with ``c_r = min_m C[n, m]`` (:func:`replica_costs`).

**Solvers** (jittable, ``k`` static):

* :func:`solve_exact`: enumerates the ``2^k`` subsets (``k <= 12``) and returns the feasible one
  with the largest kept mass (ties: least cost, then the lowest subset index). Exact.
* :func:`solve_greedy`: items by ``g / c`` (best first), each added if it still fits; then, with
  ``best_single`` (default), the best single item that fits replaces the greedy set if it keeps
  more mass (the classic modified greedy, at least half the optimum). The greedy is *exact* when
  (a) every item fits together, (b) all costs are equal (it takes the largest gates), or (c) at
  most two items are free to choose (``k <= 2``, or ``k = 3`` with ``force_top1``) and
  ``best_single`` is on: with two items the options are {}, {a}, {b}, {a, b}; if both fit the
  greedy takes both, otherwise the best single fitting item is optimal and that is what the
  best-single check returns. Elsewhere it can miss (e.g. ``k >= 3`` with mixed costs); the tests
  and ``experiments/budget_sweep.py`` measure how often.

``force_top1``: the first (highest-gate) choice is always run on its cheapest replica, even when
that alone exceeds the budget; the other choices are added only within the budget. Without it a
budget below every cost runs no routed expert at all (the layer adds only its shared experts).

**Dropped choices** get gate 0. ``renormalize=True`` rescales the kept gates so that they sum to
the original gate mass (the layer output keeps its scale); ``False`` (default) keeps the kept
gates as they are. With ``park=True`` (default) a dropped choice is re-pointed to a locally
hosted expert the token has not chosen (gate 0): it computes nothing that counts, and a real
dispatch moves no bytes for it. Without a free local expert it keeps its id (gate 0).

**Costs.** ``kind="latency"`` in seconds, ``Hardware.route_cost()``: ``C[n, m] = F_e / (peak[m]
eta_f[m]) + [n != m] 2 (lat[n, m] + a / bw[n, m])`` (expert FLOP time plus the link time of dispatch
and combine, as in the route tables and ``moe_edge.placement.objective``); summed over choices this
is the time of running them one after another, an upper bound of their parallel time.
``kind="energy"`` in joules: ``C[n, m] = F_e J_flop[m] + [n != m] 2 a J_byte`` with
:class:`EnergyModel`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig
from moe_edge.core.hardware import Hardware
from moe_edge.extensions.transform import (MoeFn, RoutingTransform, TransformError,
                                           TransformedMoE, token_servers, with_shape)

COST_KINDS = ("latency", "energy")
SOLVERS = ("greedy", "exact")
MAX_EXACT_K = 12


class BudgetError(TransformError):
  """Budgeted-selection inputs are malformed (shapes, kinds, negative budgets or costs)."""


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EnergyModel:
  """Energy of expert compute and of bytes on the wire.

  Attributes:
    pj_per_flop: picojoules per FLOP, one value for every server or one per server. Default 3:
      board power over dense FP16 tensor throughput of the edge_hetero_4 GPUs (RTX 4090 450 W /
      165 TFLOP/s = 2.7 pJ; RTX 3090 350 W / 71 TFLOP/s = 4.9 pJ; RTX A4000 140 W / 76.7 TFLOP/s
      = 1.8 pJ; Jetson AGX Orin 32 GB 40 W / 27 TFLOP/s = 1.5 pJ; mean 2.7), i.e. energy at
      full load. For scale: Horowitz, "Computing's energy problem", ISSCC 2014, gives about
      1 pJ per 16-bit FP multiply-add at the ALU alone (45 nm).
    nj_per_byte: nanojoules per byte sent between servers (counted once per byte, covering both
      endpoints and the switch). Default 20: a 1 Gbit/s Ethernet hop draws about 2-3 W of PHY,
      NIC and switch-port power at its 125 MB/s line rate (order of magnitude from the IEEE
      802.3az Energy-Efficient-Ethernet literature, e.g. Christensen et al., IEEE Commun. Mag.
      48(11), 2010), i.e. ~16-24 nJ/byte. Both figures are estimates: pass your own (flags
      ``--pj_per_flop`` / ``--nj_per_byte`` of the experiment scripts).
  """
  pj_per_flop: float | tuple[float, ...] = 3.0
  nj_per_byte: float = 20.0

  def __post_init__(self):
    v = np.atleast_1d(np.asarray(self.pj_per_flop, np.float64))
    if v.ndim != 1 or not np.all(np.isfinite(v)) or np.any(v < 0):
      raise BudgetError(f"pj_per_flop must be a finite non-negative number or one per server, "
                        f"got {self.pj_per_flop!r}.")
    if not (np.isfinite(self.nj_per_byte) and self.nj_per_byte >= 0):
      raise BudgetError(f"nj_per_byte must be finite and >= 0, got {self.nj_per_byte!r}.")

  def joules_per_flop(self, cluster: ClusterConfig) -> np.ndarray:
    """``[N]`` joules per FLOP of each server."""
    v = np.atleast_1d(np.asarray(self.pj_per_flop, np.float64)) * 1e-12
    n = cluster.num_servers
    if v.size == 1:
      return np.full(n, v[0])
    if v.size != n:
      raise BudgetError(f"pj_per_flop has {v.size} values but cluster {cluster.name!r} has {n} "
                        f"servers; give one value or one per server.")
    return v

  @property
  def joules_per_byte(self) -> float:
    return float(self.nj_per_byte) * 1e-9


def choice_cost_matrix(model: ModelConfig, cluster: ClusterConfig, kind: str,
                       energy: EnergyModel | None = None,
                       activation_bytes: int | None = None,
                       hardware: Hardware | None = None) -> np.ndarray:
  """``[N, N]`` float64 cost of running one token-choice of a token on ``n`` on server ``m``
  (seconds for ``"latency"``, joules for ``"energy"``; formulas in the module docstring).

  ``"latency"`` is ``hardware.route_cost()`` (default ``Hardware.build(model, cluster)``, the
  datasheet; pass a calibrated one to price on measured kernel efficiency).
  """
  n = cluster.num_servers
  remote = ~np.eye(n, dtype=bool)
  flops = float(model.expert_flops_per_token)
  if kind == "latency":
    hw = hardware if hardware is not None else Hardware.build(model, cluster)
    return hw.route_cost()
  if kind == "energy":
    energy = EnergyModel() if energy is None else energy
    a = model.activation_bytes if activation_bytes is None else int(activation_bytes)
    return (flops * energy.joules_per_flop(cluster)[None, :]
            + remote * 2.0 * a * energy.joules_per_byte)
  raise BudgetError(f"unknown cost kind {kind!r}; use one of {COST_KINDS}.")


def replica_costs(expert_ids: jax.Array, server: jax.Array, hosts: jax.Array,
                  cost_matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cheapest replica of every choice and its cost (local wins ties).

  Args:
    expert_ids: ``[T, k]``; server: ``[T]``; hosts: ``[N, E] bool`` (one layer);
    cost_matrix: ``[N, N]`` from :func:`choice_cost_matrix`.

  Returns:
    ``cost [T, k] float32`` and ``replica [T, k] int32`` (a server holding the expert).
  """
  hosts = jnp.asarray(hosts, bool)
  cm = jnp.asarray(cost_matrix, jnp.float32)
  holders = jnp.moveaxis(hosts[:, expert_ids], 0, -1)                  # [T, k, N]
  c = jnp.where(holders, cm[server][:, None, :], jnp.inf)
  rep = jnp.argmin(c, axis=-1).astype(jnp.int32)
  best = jnp.min(c, axis=-1)
  srv = server[:, None]
  local_c = jnp.take_along_axis(c, jnp.broadcast_to(srv[..., None], c.shape[:2] + (1,)),
                                axis=-1)[..., 0]
  use_local = local_c <= best
  return jnp.where(use_local, local_c, best), jnp.where(use_local, srv, rep).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------
def _budget(budget, t: int) -> jax.Array:
  b = jnp.asarray(budget, jnp.float32)
  return jnp.broadcast_to(b, (t,)) if b.ndim == 0 else b


def subsets(k: int, force_top1: bool = False) -> np.ndarray:
  """``[C, k] bool`` every subset of ``k`` items (bit ``r`` of the index = item ``r``); with
  ``force_top1`` only those containing item 0."""
  if not 1 <= k <= MAX_EXACT_K:
    raise BudgetError(f"the exact solver enumerates 2^k subsets; k={k} must be in "
                      f"[1, {MAX_EXACT_K}] (use the greedy for larger k).")
  s = ((np.arange(2 ** k)[:, None] >> np.arange(k)[None, :]) & 1).astype(bool)
  return s[s[:, 0]] if force_top1 else s


def solve_exact(gates: jax.Array, cost: jax.Array, budget, force_top1: bool = False) -> jax.Array:
  """Exact 0/1 knapsack per token by enumeration. ``gates, cost [T, k]``, ``budget`` scalar or
  ``[T]`` -> ``keep [T, k] bool`` (module docstring; ``cost`` must be finite, >= 0)."""
  t, k = gates.shape
  s = jnp.asarray(subsets(k, force_top1))                               # [C, k]
  g = gates.astype(jnp.float32)
  mass = jnp.sum(jnp.where(s[None], g[:, None, :], 0.0), axis=-1)       # [T, C]
  tot = jnp.sum(jnp.where(s[None], cost[:, None, :].astype(jnp.float32), 0.0), axis=-1)
  feasible = tot <= _budget(budget, t)[:, None]
  if force_top1:
    feasible = feasible | (jnp.sum(s, axis=-1) == 1)[None, :]           # {top-1} always allowed
  best_mass = jnp.max(jnp.where(feasible, mass, -jnp.inf), axis=-1, keepdims=True)
  cand = feasible & (mass >= best_mass)
  pick = jnp.argmin(jnp.where(cand, tot, jnp.inf), axis=-1)
  return s[pick]


def solve_greedy(gates: jax.Array, cost: jax.Array, budget, force_top1: bool = False,
                 best_single: bool = True) -> jax.Array:
  """Greedy by gate mass per cost (module docstring). Same arguments and result as
  :func:`solve_exact`."""
  t, k = gates.shape
  g = gates.astype(jnp.float32)
  c = cost.astype(jnp.float32)
  b = _budget(budget, t)
  ratio = jnp.where(c > 0, g / jnp.where(c > 0, c, 1.0), jnp.inf)
  free = jnp.ones((t, k), bool)
  if force_top1:
    free = free.at[:, 0].set(False)
    ratio = ratio.at[:, 0].set(-jnp.inf)  # handled separately, sorted last and skipped
  order = jnp.argsort(-ratio, axis=-1, stable=True)
  forced = (~free).astype(jnp.float32)
  acc = jnp.sum(forced * c, axis=-1)
  keep = ~free
  for j in range(k):
    idx = order[:, j]
    ci = jnp.take_along_axis(c, idx[:, None], axis=1)[:, 0]
    ok = jnp.take_along_axis(free, idx[:, None], axis=1)[:, 0] & (acc + ci <= b)
    keep = keep | (jax.nn.one_hot(idx, k, dtype=bool) & ok[:, None])
    acc = acc + jnp.where(ok, ci, 0.0)
  if best_single:
    left = b - jnp.sum(forced * c, axis=-1)
    fits = free & (c <= left[:, None])
    single_g = jnp.where(fits, g, -jnp.inf)
    best = jnp.argmax(single_g, axis=-1)
    greedy_mass = jnp.sum(jnp.where(keep & free, g, 0.0), axis=-1)
    use = jnp.max(single_g, axis=-1) > greedy_mass
    keep = jnp.where(use[:, None], ~free | jax.nn.one_hot(best, k, dtype=bool), keep)
  return keep


# --------------------------------------------------------------------------------------------
# Selection on a layer's routing
# --------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BudgetSelection:
  """Result of :func:`budgeted_selection`. All ``[T, k]``.

  Attributes:
    expert_ids: int32 ids to dispatch (dropped choices parked on a free local expert).
    gates: float32 gates (0 for dropped choices; rescaled if ``renormalize``).
    keep: bool, the choice runs.
    replica: int32 server that runs it (the cheapest holder), ``-1`` when dropped.
    cost: float32 cost of the choice (0 when dropped).
  """
  expert_ids: jax.Array
  gates: jax.Array
  keep: jax.Array
  replica: jax.Array
  cost: jax.Array


def _park(expert_ids, keep, local):
  """Re-point dropped choices to unused local experts (lowest id first); ``local [T, E]``."""
  n_exp = local.shape[1]
  taken = jnp.any(jax.nn.one_hot(expert_ids, n_exp, dtype=bool), axis=1)
  cols = []
  for r in range(expert_ids.shape[1]):
    spare = local & ~taken
    slot = jnp.argmax(spare, axis=1).astype(jnp.int32)
    do = ~keep[:, r] & jnp.any(spare, axis=1)
    cols.append(jnp.where(do, slot, expert_ids[:, r]))
    taken = taken | (do[:, None] & jax.nn.one_hot(slot, n_exp, dtype=bool))
  return jnp.stack(cols, axis=1)


def budgeted_selection(expert_ids: jax.Array, gates: jax.Array, server: jax.Array,
                       hosts: jax.Array, cost_matrix: jax.Array, budget, solver: str = "greedy",
                       force_top1: bool = True, renormalize: bool = False, park: bool = True,
                       best_single: bool = True) -> BudgetSelection:
  """Choose, per token, which of its ``k`` choices to run and where, within ``budget``.

  Args:
    expert_ids: ``[T, k]``; gates: ``[T, k]``; server: ``[T]``; hosts: ``[N, E] bool`` (this
      layer); cost_matrix: ``[N, N]`` (:func:`choice_cost_matrix`).
    budget: scalar or ``[T]``, cost units per token (``inf``: keep everything).
    solver: ``"greedy"`` or ``"exact"``.
    force_top1, renormalize, park, best_single: module docstring.
  """
  if solver not in SOLVERS:
    raise BudgetError(f"unknown solver {solver!r}; use one of {SOLVERS}.")
  ids = expert_ids.astype(jnp.int32)
  cost, replica = replica_costs(ids, server, hosts, cost_matrix)
  if solver == "exact":
    keep = solve_exact(gates, cost, budget, force_top1)
  else:
    keep = solve_greedy(gates, cost, budget, force_top1, best_single)
  g = jnp.where(keep, gates.astype(jnp.float32), 0.0)
  if renormalize:
    kept = jnp.sum(g, axis=-1, keepdims=True)
    total = jnp.sum(gates.astype(jnp.float32), axis=-1, keepdims=True)
    g = jnp.where(kept > 0, g * (total / jnp.where(kept > 0, kept, 1.0)), 0.0)
  new_ids = _park(ids, keep, jnp.asarray(hosts, bool)[server]) if park else ids
  return BudgetSelection(new_ids, g, keep, jnp.where(keep, replica, -1),
                         jnp.where(keep, cost, 0.0))


def budget_transform(hosts, cost_matrix, server, budget, solver: str = "greedy",
                     force_top1: bool = True, renormalize: bool = False, park: bool = True,
                     best_single: bool = True) -> RoutingTransform:
  """Routing transform applying :func:`budgeted_selection` at every MoE layer.

  ``hosts [N, L, E]``, ``cost_matrix [N, N]``, ``server [B]`` or ``[B, S]``; ``budget`` a scalar
  (may be traced) or ``[B, S]``. ``changed`` marks dropped choices.
  """
  hosts = jnp.asarray(hosts, bool)
  cm = jnp.asarray(cost_matrix, jnp.float32)
  if hosts.ndim != 3 or cm.shape != (hosts.shape[0],) * 2:
    raise BudgetError(f"hosts must be [N, L, E] and cost_matrix [N, N] with the same N; got "
                      f"{tuple(hosts.shape)} and {tuple(cm.shape)}.")

  def transform(layer, x, expert_ids, gates):
    del x
    b, s, k = expert_ids.shape
    bud = jnp.asarray(budget, jnp.float32)
    bud = bud if bud.ndim == 0 else bud.reshape(b * s)
    sel = budgeted_selection(expert_ids.reshape(b * s, k), gates.reshape(b * s, k),
                             token_servers(server, (b, s)), hosts[:, layer], cm, bud, solver,
                             force_top1, renormalize, park, best_single)
    return (sel.expert_ids.reshape(b, s, k), sel.gates.reshape(b, s, k),
            ~sel.keep.reshape(b, s, k))

  return with_shape(transform, *hosts.shape[1:])


def budget_moe_fn(hosts, cost_matrix, server, budget, solver: str = "greedy",
                  force_top1: bool = True, renormalize: bool = False, park: bool = True,
                  moe_fn: MoeFn | None = None, record: bool = False,
                  best_single: bool = True) -> TransformedMoE:
  """``moe_fn`` applying :func:`budget_transform`, then ``moe_fn``."""
  return TransformedMoE(budget_transform(hosts, cost_matrix, server, budget, solver, force_top1,
                                         renormalize, park, best_single), moe_fn, record)


def kept_mass(gates: jax.Array, keep: jax.Array) -> jax.Array:
  """``[T]`` original gate mass of the kept choices."""
  return jnp.sum(jnp.where(keep, gates, 0.0), axis=-1)


__all__: Sequence[str] = (
    "BudgetError", "BudgetSelection", "COST_KINDS", "EnergyModel", "SOLVERS", "budget_moe_fn",
    "budget_transform", "budgeted_selection", "choice_cost_matrix", "kept_mass", "replica_costs",
    "solve_exact", "solve_greedy", "subsets")
