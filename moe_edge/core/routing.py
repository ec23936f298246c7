"""Route tables: where a server sends each expert's token-choices (docs/DESIGN.md, "Placement").

:func:`route_table` returns exactly what the readable reference :func:`route_table_reference`
returns (the tests compare them), but
it runs in a fraction of the time on large instances (a million flows at 256 experts x 61 layers
x 64 servers, where the reference's per-flow Python loop takes tens of seconds). The reference
rule, per layer: flows ``(n, e)`` that are not local are taken heaviest first (stable in ``(n, e)``
order); each goes to the replica with the least ``Hardware.route_cost()[n, m]`` (link time there and
back plus ``m``'s expert compute per token, calibrated), replicas within ``slack`` (relative) of
the cheapest being ties broken by the least ``load / Hardware.flops`` so far (lowest server id on
equal scores), and adds its traffic to that replica's load.

How it is made fast without changing a single decision:

* flows whose near set (the replicas within ``slack``) has one member never look at the load:
  their destination is computed for all of them at once;
* only flows with two or more near replicas and positive traffic ("contested") depend on the
  order; they are replayed in a loop whose step ``s`` handles the ``s``-th contested flow of
  *every* layer at once (layers never share loads), adding the traffic of the single-choice flows
  that precede it first, with ``np.add.at`` in the reference's order (so even the floating-point
  sums are the same);
* contested flows with zero traffic come last in every layer and all see the final loads.
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.sorting import stable_argsort_desc

_CHUNK = 1024  # replicated (layer, expert) columns per near-mask block


def route_table(hosts: np.ndarray, hardware: Hardware, traffic: np.ndarray | None = None,
                slack: float = 0.1) -> np.ndarray:
  """Same result as :func:`route_table_reference` (see the module docstring).

  Args:
    hosts: ``[N, L, E]`` bool.
    traffic: ``[N, L, E]`` non-negative expected token-choices (defaults to uniform).
  Returns:
    ``route [N, L, E]`` int32.
  """
  hosts = np.asarray(hosts, dtype=bool)
  n_srv, n_lay, n_exp = hosts.shape
  traffic = (np.ones(hosts.shape) if traffic is None
             else np.asarray(traffic, dtype=np.float64))
  if traffic.shape != hosts.shape:
    raise PlacementError(f"traffic shape {traffic.shape} differs from hosts {hosts.shape}.")
  if np.any(~(traffic >= 0)):
    raise PlacementError("traffic must be finite and non-negative.")
  missing = np.argwhere(~hosts.any(axis=0))
  if missing.size:
    l, e = missing[0]
    raise PlacementError(f"expert {e} of layer {l} is hosted nowhere.")
  cost = hardware.route_cost()
  peak = hardware.flops
  route = np.where(hosts, np.arange(n_srv)[:, None, None], -1).astype(np.int32)
  load = np.ascontiguousarray((traffic * hosts).sum(axis=2).T)  # [L, N], as the reference

  # Flows of every layer in the reference's order (stable sort, then drop local ones).
  t_l = traffic.transpose(1, 0, 2).reshape(n_lay, n_srv * n_exp)
  order = stable_argsort_desc(t_l)
  remote = np.take_along_axis(~hosts.transpose(1, 0, 2).reshape(n_lay, -1), order, axis=1)
  f_lay, f_k = np.nonzero(remote)  # layer-major, processing order inside a layer
  f_pos = order[f_lay, f_k]
  f_srv, f_exp = f_pos // n_exp, f_pos % n_exp
  f_t = traffic[f_srv, f_lay, f_exp]

  # Near sets: single-replica experts have one; replicated columns get a mask per source.
  dest, near, f_col, contested = _near_sets(hosts, cost, slack, f_lay, f_exp, f_srv)
  busy = contested & (f_t > 0)

  # Step of each flow: how many busy contested flows of its layer come before it.
  lay_start = np.searchsorted(f_lay, np.arange(n_lay))
  csum = np.cumsum(busy)
  before = csum - busy - np.concatenate([[0], csum])[lay_start][f_lay]
  steps = int(before[busy].max()) + 1 if busy.any() else 0

  fixed = ~contested & (f_t > 0)
  fx = np.flatnonzero(fixed)
  key = before[fx]
  if steps < np.iinfo(np.uint16).max:  # small keys: numpy's stable sort is a radix sort
    key = key.astype(np.uint16)
  fx = fx[np.argsort(key, kind="stable")]
  fx_cell = f_lay[fx] * n_srv + dest[fx]
  fx_bounds = np.searchsorted(before[fx], np.arange(steps + 2))
  load_flat = load.reshape(-1)

  bz = np.flatnonzero(busy)
  s_near = np.zeros((steps, n_lay, n_srv), dtype=bool)
  s_near[before[bz], f_lay[bz]] = near[f_col[bz], f_srv[bz]]
  s_t = np.zeros((steps, n_lay))
  s_t[before[bz], f_lay[bz]] = f_t[bz]
  s_dest = np.zeros((steps, n_lay), dtype=np.int64)
  rows = np.arange(n_lay)
  for s in range(steps):
    a, b = fx_bounds[s], fx_bounds[s + 1]
    if b > a:
      np.add.at(load_flat, fx_cell[a:b], f_t[fx[a:b]])
    m = np.where(s_near[s], load / peak, np.inf).argmin(axis=1)
    load[rows, m] += s_t[s]
    s_dest[s] = m
  if bz.size:
    dest[bz] = s_dest[before[bz], f_lay[bz]]
  a = fx_bounds[steps]
  np.add.at(load_flat, fx_cell[a:], f_t[fx[a:]])

  idle = np.flatnonzero(contested & (f_t == 0))
  if idle.size:
    score = np.where(near[f_col[idle], f_srv[idle]], (load / peak)[f_lay[idle]], np.inf)
    dest[idle] = score.argmin(axis=1)
  route[f_srv, f_lay, f_exp] = dest
  return route


def route_table_reference(hosts: np.ndarray, hardware: Hardware, traffic: np.ndarray | None = None,
                          slack: float = 0.1) -> np.ndarray:
  """Default route table: local if hosted, else the cheapest replica, spreading load.

  This is the readable reference; :func:`route_table` returns the identical table vectorised
  over layers and is what :meth:`~moe_edge.core.problem.Placement.from_hosts` uses.

  A token on ``n`` choosing a non-local expert (l, e) goes to the replica ``m`` with the least
  ``hardware.route_cost()[n, m]`` (link time plus expert compute per token on m); replicas within
  ``slack`` (relative) of the cheapest are treated as ties and the one with the least traffic
  assigned so far in that layer wins, so hot replicated experts share their load. Flows are assigned
  heaviest first.

  Args:
    hosts: ``[N, L, E]`` bool.
    traffic: ``[N, L, E]`` expected token-choices (defaults to uniform).
  Returns:
    ``route [N, L, E]`` int32.
  """
  n_srv, n_lay, n_exp = hosts.shape
  if traffic is None:
    traffic = np.ones(hosts.shape)
  cost = hardware.route_cost()
  route = np.full(hosts.shape, -1, dtype=np.int32)
  idx = np.arange(n_srv)
  for l in range(n_lay):
    loc = hosts[:, l, :]
    route[:, l, :] = np.where(loc, idx[:, None], -1)
    load = (traffic[:, l, :] * loc).sum(axis=1).astype(np.float64)
    need = np.argwhere(~loc)
    order = np.argsort(-traffic[need[:, 0], l, need[:, 1]], kind="stable")
    for n, e in need[order]:
      reps = np.flatnonzero(loc[:, e])
      if reps.size == 0:
        raise PlacementError(f"expert {e} of layer {l} is hosted nowhere.")
      c = cost[n, reps]
      near = reps[c <= c.min() * (1.0 + slack)]
      m = near[np.argmin(load[near] / hardware.flops[near])]
      route[n, l, e] = m
      load[m] += traffic[n, l, e]
  return route

def _near_sets(hosts: np.ndarray, cost: np.ndarray, slack: float, f_lay: np.ndarray,
               f_exp: np.ndarray, f_srv: np.ndarray):
  """The replicas within ``slack`` of the cheapest for every remote flow ``(f_srv, f_lay,
  f_exp)``: ``(dest [F]`` (right where one replica is near), ``near [C, N, N]`` (per replicated
  column, source, replica), ``f_col [F]`` (each flow's column, -1 if unreplicated),
  ``contested [F]`` (two or more near replicas)).
  """
  n_srv, n_lay, n_exp = hosts.shape
  n_rep = hosts.sum(axis=0)  # [L, E]
  dest = np.argmax(hosts, axis=0)[f_lay, f_exp].astype(np.int64)  # right when one replica
  multi = n_rep[f_lay, f_exp] > 1
  cols = np.argwhere(n_rep > 1)  # [C, 2]
  col_id = np.full((n_lay, n_exp), -1, dtype=np.int64)
  col_id[cols[:, 0], cols[:, 1]] = np.arange(len(cols))
  near = np.zeros((len(cols), n_srv, n_srv), dtype=bool)  # [C, source, replica]
  by_count = np.argsort(n_rep[cols[:, 0], cols[:, 1]], kind="stable")  # blocks of similar R
  for a in range(0, len(cols), _CHUNK):
    ci = by_count[a:a + _CHUNK]
    h = hosts[:, cols[ci, 0], cols[ci, 1]].T  # [c, N]
    r = int(h.sum(axis=1).max())
    reps = np.argsort(~h, axis=1, kind="stable")[:, :r]  # [c, R] replicas first, in id order
    real = np.take_along_axis(h, reps, axis=1)
    cm = np.where(real[:, None, :], cost[:, reps].transpose(1, 0, 2), np.inf)  # [c, N, R]
    ok = cm <= cm.min(axis=2, keepdims=True) * (1.0 + slack)
    c_idx = np.broadcast_to(ci[:, None, None], ok.shape)
    s_idx = np.broadcast_to(np.arange(n_srv)[None, :, None], ok.shape)
    near[c_idx[ok], s_idx[ok], np.broadcast_to(reps[:, None, :], ok.shape)[ok]] = True
  f_col = col_id[f_lay, f_exp]
  mi = np.flatnonzero(multi)
  n_near = near.sum(axis=2)[f_col[mi], f_srv[mi]]  # [M]
  one = n_near == 1
  dest[mi[one]] = np.argmax(near, axis=2)[f_col[mi[one]], f_srv[mi[one]]]
  contested = np.zeros(len(f_lay), dtype=bool)
  contested[mi[~one]] = True
  return dest, near, f_col, contested
