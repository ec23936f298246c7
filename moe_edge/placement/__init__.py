"""Expert placement: the problem (``problem.py``), one objective (``objective.py``) and the
methods, all ``method(problem, seed=0, **options) -> Placement``:

  dancemoe        activation-aware: entropy budgets, greedy marginal-gain replicas, coverage,
                  exchange search on the objective (milliseconds)
  dancemoe_refined  dancemoe plus the latency refinement on the cost model (refine.py; seconds)
  uniform_ep      vanilla expert parallelism (round robin, no replicas)
  random          random copies, then random replicas
  greedy_local    each server its own hottest experts, then the rest spread
  eplb            DeepSeek EPLB (load-balanced replication, no locality)
  topology_aware  each expert once where its traffic's link time is least
  ilp             the exact optimum of the objective (small instances)

``place(name, problem, seed=0, **options)`` runs one by name.
"""
from __future__ import annotations

from typing import Callable

from moe_edge.placement import baselines, dancemoe, eplb, ilp
from moe_edge.placement.objective import objective, objective_terms
from moe_edge.placement.problem import Placement, PlacementError, PlacementProblem

METHODS: dict[str, Callable[..., Placement]] = {
    "dancemoe": dancemoe.dancemoe,
    "dancemoe_refined": dancemoe.dancemoe_refined,
    "uniform_ep": baselines.uniform_ep,
    "random": baselines.random_placement,
    "greedy_local": baselines.greedy_local,
    "eplb": eplb.eplb,
    "topology_aware": baselines.topology_aware,
    "ilp": ilp.ilp,
}


def place(name: str, problem: PlacementProblem, seed: int = 0, **options) -> Placement:
  """Run placement method ``name`` on ``problem``; unknown names list the known ones."""
  if name not in METHODS:
    raise PlacementError(f"unknown placement method {name!r}; known methods: "
                         f"{', '.join(METHODS)}.")
  return METHODS[name](problem, seed=seed, **options)


__all__ = ["METHODS", "Placement", "PlacementError", "PlacementProblem", "objective",
           "objective_terms", "place"]
