"""The placement objective: one linear, MILP-friendly surrogate of the MoE step time.

Every placement method is judged by the same number, evaluated exactly on a
:class:`~moe_edge.placement.problem.Placement` (its ``hosts`` *and* its ``route`` table), so the
ILP optimum (``ilp.py``) is comparable with every heuristic. With

* ``T [N, L, E] = tokens[n] * freq[n, l, e]``: expected token-choices per step of expert (l, e)
  from server n (``PlacementProblem.traffic``),
* ``tau [N, N]``: seconds to send one token's activations n -> m and back
  (``problem.hardware.link_time_per_token()``; zero on the diagonal),
* ``t [M] = expert_flops_per_token / (peak_flops[m] eta_f[m])``: seconds of expert compute per
  token on m (``problem.hardware.compute_time_per_token()``; calibrated when the problem is),
* ``r [N, L, E]``: the route table (``r[n, l, e] = n`` when local),

the objective is::

  comm(l)    = sum_{n, e} T[n, l, e] * tau[n, r[n, l, e]]
  load(m, l) = sum_{n, e : r[n, l, e] = m} T[n, l, e]
  compute(l) = max_m load(m, l) * t[m]
  J          = sum_l comm(l) + lam * compute(l)

``comm`` is the link time spent on remote token-choices (zero when served locally) and
``compute`` is the expert compute time of the slowest server in each layer. The full roofline
latency of a placement (per-layer maxima over links, memory-bandwidth-bound decode, dense compute)
is the cost model's job (``moe_edge/cost/``); ``J`` is its surrogate: linear in the placement and
routing variables apart from one max per layer, which a MILP expresses with one auxiliary
variable per layer.
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem


def compute_time_per_token(problem: PlacementProblem) -> np.ndarray:
  """``[N]`` seconds of one routed expert's compute for one token on each server (the
  problem's hardware)."""
  return problem.hardware.compute_time_per_token()


def layer_loads(problem: PlacementProblem, route: np.ndarray,
                traffic: np.ndarray | None = None) -> np.ndarray:
  """``[N, L']`` token-choices each server computes per layer under ``route [N, L', E]``.

  ``traffic [N, L', E]`` defaults to ``problem.traffic`` (then ``L' = L``); pass the traffic of
  a subset of layers together with their route.
  """
  traffic = problem.traffic if traffic is None else traffic
  n, l = problem.shape[0], route.shape[1]
  layer = np.broadcast_to(np.arange(l)[None, :, None], route.shape)
  flat = route.astype(np.int64) * l + layer
  return np.bincount(flat.ravel(), weights=traffic.ravel(), minlength=n * l).reshape(n, l)


def objective_terms(problem: PlacementProblem, placement: Placement,
                    lam: float = 1.0) -> dict[str, float]:
  """The objective and its parts for ``placement`` (see the module docstring).

  Returns:
    dict with ``objective`` (J), ``comm`` (sum of comm(l)), ``compute`` (sum of compute(l),
    unweighted), ``lam``, ``coverage`` (fraction of token-choices served locally; 1.0 when there
    is no traffic) and ``remote_traffic`` (token-choices per step that cross servers).
  """
  route = np.asarray(placement.route)
  if route.shape != problem.shape:
    raise PlacementError(f"placement route is {list(route.shape)} but the problem is "
                         f"[N, L, E] = {list(problem.shape)}.")
  if lam < 0:
    raise PlacementError(f"lam={lam}: the load-balance weight must be >= 0.")
  t_traffic = problem.traffic
  tau = problem.hardware.link_time_per_token()
  n_idx = np.arange(problem.shape[0])[:, None, None]
  comm = float(np.sum(t_traffic * tau[n_idx, route]))
  t = compute_time_per_token(problem)
  compute = float(np.sum((layer_loads(problem, route) * t[:, None]).max(axis=0)))
  local = route == n_idx
  total = float(t_traffic.sum())
  served_local = float(t_traffic[local].sum())
  return dict(objective=comm + lam * compute, comm=comm, compute=compute, lam=float(lam),
              coverage=served_local / total if total > 0 else 1.0,
              remote_traffic=total - served_local)


def objective(problem: PlacementProblem, placement: Placement, lam: float = 1.0) -> float:
  """J of ``placement`` on ``problem`` (seconds per step, the module docstring's formula)."""
  return objective_terms(problem, placement, lam)["objective"]
