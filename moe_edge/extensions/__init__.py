"""Beyond the paper: routing transforms on the dispatch path (all off by default).

* ``similarity.py``   expert similarity from weights and from calibration outputs
* ``substitution.py`` importance-driven substitution of remote low-gate experts by similar local
                      ones, and a local-preferring top-k
* ``budgeted.py``     per-token budgeted expert selection (latency or energy), exact and greedy
* ``transform.py``    the composable ``moe_fn`` wrapper: transform the routing, then run any
                      ``moe_fn`` (the dense reference or the distributed dispatch)
* ``harness.py``      evaluation on real text for the sweeps in ``experiments/`` (import it
                      explicitly; it pulls in the cost model and the placement registry)
"""
from moe_edge.extensions.budgeted import (BudgetError, BudgetSelection, EnergyModel,
                                          budget_moe_fn, budget_transform, budgeted_selection,
                                          choice_cost_matrix, kept_mass, replica_costs,
                                          solve_exact, solve_greedy)
from moe_edge.extensions.similarity import (SimilarityError, calibration_similarity,
                                            capture_moe_inputs, layer_weight_similarity,
                                            output_similarity, rank_correlation,
                                            routed_weights, weight_similarity)
from moe_edge.extensions.substitution import (drop_remote, drop_remote_transform,
                                              local_preference_moe_fn,
                                              local_preference_transform, prefer_local,
                                              router_weights, substitute, substitution_moe_fn,
                                              substitution_transform)
from moe_edge.extensions.transform import (TransformError, TransformedMoE, dense_moe_fn,
                                           identity_transform, token_servers)

__all__ = [
    "BudgetError", "BudgetSelection", "EnergyModel", "SimilarityError", "TransformError",
    "TransformedMoE", "budget_moe_fn", "budget_transform", "budgeted_selection",
    "calibration_similarity", "capture_moe_inputs", "choice_cost_matrix", "dense_moe_fn",
    "drop_remote", "drop_remote_transform",
    "identity_transform", "kept_mass", "layer_weight_similarity", "local_preference_moe_fn",
    "local_preference_transform", "output_similarity", "prefer_local", "rank_correlation",
    "replica_costs", "routed_weights", "router_weights", "solve_exact", "solve_greedy",
    "substitute", "substitution_moe_fn", "substitution_transform", "token_servers",
    "weight_similarity",
]
