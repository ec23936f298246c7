"""Expert placement: the problem (``moe_edge/core/problem.py``), one objective
(``objective.py``) and the registered methods (``registry.py``), each
``method(problem, options, context) -> Placement``:

  dancemoe          ours: activation-aware: entropy budgets, greedy marginal-gain replicas,
                    coverage, exchange search on the objective (milliseconds)
  dancemoe_refined  ours: dancemoe plus the latency refinement on the cost model (refine.py)
  uniform_ep        baseline: vanilla expert parallelism (round robin, no replicas)
  random            baseline: random copies, then random replicas
  greedy_local      baseline: each server its own hottest experts, then the rest spread
  eplb              baseline: DeepSeek EPLB (load-balanced replication, no locality)
  topology_aware    baseline: each expert once where its traffic's link time is least
  ilp               oracle: the exact optimum of the objective (small instances)
  prism             paper: the paper's algorithm as published (entropy budgets, greedy, repair)
  redundance        baseline: uniform_ep plus replicas of the most-loaded experts
  smartmoe          baseline: SmartMoE's load-balanced placement, one copy per expert
  eplb_hetero       baseline: EPLB with memory-sized slots and speed-weighted packing
  latency_search    ours: search on the expected request latency (search.py; about a second)
  best_known        oracle: the same search, long, from every start (the reference)

A new method is one file with ``@register(name, role, OptionsType)`` and one import line here
(docs/DESIGN.md, "Adding a placement method"). ``registry.place(name, problem, options,
context)`` runs one by name; :func:`place` below is the keyword form
``place(name, problem, seed=0, **options)``.
"""
from __future__ import annotations

# One import per method module: importing it registers its methods (order = table order).
from moe_edge.placement import dancemoe  # noqa: F401  (registers dancemoe, dancemoe_refined)
from moe_edge.placement import baselines  # noqa: F401  (uniform_ep, random, greedy_local)
from moe_edge.placement import eplb  # noqa: F401
from moe_edge.placement import topology  # noqa: F401  (topology_aware)
from moe_edge.placement import ilp  # noqa: F401
from moe_edge.placement import prism  # noqa: F401
from moe_edge.placement import redundance  # noqa: F401
from moe_edge.placement import smartmoe  # noqa: F401
from moe_edge.placement import eplb_hetero  # noqa: F401
from moe_edge.placement import search  # noqa: F401  (latency_search, best_known)
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.placement import registry
from moe_edge.placement.objective import objective, objective_terms
from moe_edge.placement.registry import PlacementContext, WorkloadSummary


def place(name: str, problem: PlacementProblem, seed: int = 0, **options) -> Placement:
  """Run method ``name`` with keyword options (checked against its options dataclass) and
  ``PlacementContext(seed=seed)``; :func:`registry.place` takes the options object and a full
  context."""
  return registry.place(name, problem, options, PlacementContext(seed=seed))


__all__ = ["Placement", "PlacementContext", "PlacementError", "PlacementProblem",
           "WorkloadSummary", "objective", "objective_terms", "place", "registry"]
