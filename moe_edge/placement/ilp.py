"""The exact optimum of the placement objective (``objective.py``) by mixed-integer programming.

Variables (all binary except z)::

  X[n, l, e]     server n hosts expert (l, e)
  y[n, m, l, e]  server n sends its token-choices of (l, e) to server m (m = n: local)
  z[l] >= 0      the slowest server's expert compute time in layer l

  minimise   sum_{n,m,l,e} T[n,l,e] * tau[n,m] * y[n,m,l,e]  +  lam * sum_l z[l]
  subject to y[n,m,l,e] <= X[m,l,e]              route only to a replica
             sum_m y[n,m,l,e] = 1                every choice goes somewhere
             y[n,n,l,e] >= X[n,l,e]              local choices stay local
             sum_{l,e} X[n,l,e] <= capacity[n]   memory
             sum_n X[n,l,e] >= 1                 every expert hosted
             t[m] * sum_{n,e} T[n,l,e] * y[n,m,l,e] <= z[l]   per server m and layer l

Making ``y`` binary (not a fraction) gives an integral route table, so the optimum is exactly
the objective of the returned :class:`Placement` (a fractional split could beat every route
table when the load term matters). Solved with ``scipy.optimize.milp`` (HiGHS); costs are scaled
to O(1) internally so HiGHS's absolute tolerances do not end the search early. Only for small
instances: ``N * L * E`` is limited (``max_size``) unless ``force=True``.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement.common import finish
from moe_edge.placement.registry import PlacementContext, register

MAX_SIZE = 1024  # default limit on N * L * E

_STATUS = {0: "optimal", 1: "limit_reached", 2: "infeasible", 3: "unbounded", 4: "other"}


def _model(problem: PlacementProblem, lam: float):
  """Cost vector, constraints, bounds, integrality and the cost scale of the MILP."""
  n, l, e = problem.shape
  nle = n * l * e
  traffic = problem.traffic
  tau = problem.hardware.link_time_per_token()
  t = problem.hardware.compute_time_per_token()
  x_id = np.arange(nle).reshape(n, l, e)
  y_id = nle + np.arange(n * n * l * e).reshape(n, n, l, e)
  use_z = lam > 0
  z_id = nle + n * n * l * e + np.arange(l)
  num = nle + n * n * l * e + (l if use_z else 0)

  c_y = traffic[:, None, :, :] * tau[:, :, None, None]  # [n, m, l, e]
  scale = max(float(c_y.max()), lam * float(t.max() * traffic.sum(axis=(0, 2)).max()), 1e-300)
  c = np.zeros(num)
  c[y_id.ravel()] = c_y.ravel() / scale
  if use_z:
    c[z_id] = 1.0

  rows, cols, vals, lo, hi = [], [], [], [], []
  row = 0

  def add(r, cidx, v, lb, ub, count):
    nonlocal row
    rows.append(row + np.asarray(r).ravel())
    cols.append(np.asarray(cidx).ravel())
    vals.append(np.broadcast_to(v, np.shape(cidx)).ravel().astype(np.float64))
    lo.append(np.full(count, lb, dtype=np.float64))
    hi.append(np.full(count, ub, dtype=np.float64))
    row += count

  # y[n, m, l, e] - X[m, l, e] <= 0
  k = n * n * l * e
  r = np.arange(k)
  add(np.stack([r, r]), np.stack([y_id.ravel(), np.broadcast_to(x_id[None], y_id.shape).ravel()]),
      np.stack([np.ones(k), -np.ones(k)]), -np.inf, 0.0, k)
  # sum_m y[n, m, l, e] = 1
  r = np.broadcast_to(np.arange(nle).reshape(n, 1, l, e), y_id.shape)
  add(r, y_id, 1.0, 1.0, 1.0, nle)
  # X[n, l, e] - y[n, n, l, e] <= 0
  diag = y_id[np.arange(n), np.arange(n)]  # [n, l, e]
  r = np.arange(nle)
  add(np.stack([r, r]), np.stack([x_id.ravel(), diag.ravel()]),
      np.stack([np.ones(nle), -np.ones(nle)]), -np.inf, 0.0, nle)
  # capacity
  add(np.broadcast_to(np.arange(n)[:, None, None], x_id.shape), x_id, 1.0, -np.inf, 0.0, n)
  hi[-1] = problem.capacity.astype(np.float64)
  # coverage
  add(np.broadcast_to(np.arange(l * e).reshape(1, l, e), x_id.shape), x_id, 1.0, 1.0, np.inf,
      l * e)
  if use_z:  # lam * t[m] * sum_{n,e} T[n,l,e] y[n,m,l,e] / scale - z[l] <= 0, row per (m, l)
    r = np.broadcast_to((np.arange(n)[None, :, None, None] * l
                         + np.arange(l)[None, None, :, None]), y_id.shape)
    v = lam * traffic[:, None, :, :] * t[None, :, None, None] / scale
    zr = np.arange(n * l)
    zc = np.broadcast_to(z_id[None, :], (n, l)).ravel()
    add(np.concatenate([r.ravel(), zr]), np.concatenate([y_id.ravel(), zc]),
        np.concatenate([v.ravel(), -np.ones(n * l)]), -np.inf, 0.0, n * l)

  a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                    shape=(row, num))
  integrality = np.ones(num)
  ub = np.ones(num)
  if use_z:
    integrality[z_id] = 0
    ub[z_id] = np.inf
  cons = LinearConstraint(a, np.concatenate(lo), np.concatenate(hi))
  return c, cons, Bounds(np.zeros(num), ub), integrality, scale, (x_id, y_id)


@dataclasses.dataclass(frozen=True)
class IlpOptions:
  """Options of :func:`ilp`.

  Attributes:
    lam: weight of the load-balance term (as in ``objective.py``).
    time_limit: seconds HiGHS may search; on timeout the best placement found is returned and
      ``info["status"]`` says ``limit_reached`` (``info["gap"]`` is then the proven gap).
    mip_rel_gap: relative optimality gap at which HiGHS stops.
    max_size, force: refuse instances with ``N * L * E > max_size`` unless ``force``.
  """
  lam: float = 1.0
  time_limit: float = 60.0
  mip_rel_gap: float = 1e-6
  max_size: int = MAX_SIZE
  force: bool = False


@register("ilp", "oracle", IlpOptions)
def ilp(problem: PlacementProblem, options: IlpOptions = IlpOptions(),
        context: PlacementContext = PlacementContext()) -> Placement:
  """The optimal placement and route table for the objective (module docstring).

  Returns:
    A Placement whose ``info`` has ``status``, ``objective`` (of the returned placement),
    ``milp_objective``, ``bound`` (HiGHS's dual bound) and ``gap`` (relative, proven).
  """
  lam, time_limit, mip_rel_gap = options.lam, options.time_limit, options.mip_rel_gap
  max_size = options.max_size
  n, l, e = problem.shape
  size = n * l * e
  if size > max_size and not options.force:
    raise PlacementError(
        f"ilp: the instance has N*L*E = {n}*{l}*{e} = {size} > max_size={max_size} "
        f"({size + n * size:,} binary variables); the MILP is for small instances. Use a "
        f"heuristic (dancemoe), a smaller problem, or the option force=True.")
  if lam < 0:
    raise PlacementError(f"lam={lam}: the load-balance weight must be >= 0.")
  start = time.perf_counter()
  c, cons, bounds, integrality, scale, (x_id, y_id) = _model(problem, lam)
  res = milp(c, constraints=cons, bounds=bounds, integrality=integrality,
             options=dict(time_limit=float(time_limit), mip_rel_gap=float(mip_rel_gap),
                          disp=False))
  if res.x is None:
    raise PlacementError(f"ilp: HiGHS found no solution ({_STATUS.get(res.status, res.status)}: "
                         f"{res.message}); raise time_limit or check capacities.")
  hosts = res.x[x_id] > 0.5
  route = np.argmax(res.x[y_id], axis=1).astype(np.int32)  # [n, l, e]: the m with y = 1
  bound = getattr(res, "mip_dual_bound", None)
  milp_obj = float(res.fun) * scale
  bound = float(bound) * scale if bound is not None and np.isfinite(bound) else None
  info = dict(seed=context.seed, status=_STATUS.get(res.status, str(res.status)),
              milp_objective=milp_obj, bound=bound,
              gap=(max(milp_obj - bound, 0.0) / milp_obj if bound is not None and milp_obj > 0
                   else 0.0),
              num_binaries=int(integrality.sum()), time_limit=time_limit,
              mip_rel_gap=mip_rel_gap)
  return finish(problem, hosts, "ilp", start, info, route=route, lam=lam)
