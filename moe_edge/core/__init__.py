"""Types every layer of moe-edge shares and that import no layer above them (docs/DESIGN.md,
"Layout"): ``errors`` (MoeEdgeError, the base of every moe-edge error), ``trace``
(ActivationTrace), ``routing_stats`` (RoutingStats), ``hardware`` (Hardware: every cost
formula's per-server and per-link inputs), ``problem`` (PlacementProblem, Placement),
``routing`` (route tables).

This package imports nothing at package level: ``moe_edge.config`` imports ``core.errors``, and
``core.problem`` imports ``moe_edge.config``; import the types from their modules.
"""
