r"""Runtime migration: move expert replicas when the workload drifts, and survive a lost server.

A running cluster serves with a placement planned for yesterday's activation frequencies. When
the online statistics (:mod:`moe_edge.workload.online_stats`) say the workload moved, this
package decides *whether* to move experts, plans a new placement that stays *close* to the
current one, and schedules the weight copies so that every expert stays reachable at every
moment (``docs/DESIGN.md``, data flow: online statistics -> trigger -> incremental plan ->
weights moved).

Modules, one concept each:

* :mod:`~moe_edge.migration.slots`: stable slot tables (kept experts keep their slots).
* :mod:`~moe_edge.migration.schedule`: the copies and drops between two placements, in link
  rounds, and their transfer time (:func:`move_cost`).
* :mod:`~moe_edge.migration.trigger`: the cost-benefit trigger (:func:`should_migrate`), held-out
  savings and the choice of a plan's prefix (:func:`choose_prefix`).
* :mod:`~moe_edge.migration.incremental`: the greedy incremental planner
  (:func:`plan_incremental`), the full re-plan, coverage lower bounds.
* :mod:`~moe_edge.migration.failure`: losing a server (:func:`fail_server`).
* :mod:`~moe_edge.migration.config`: :class:`MigrationConfig`, every setting of a replay.
* :mod:`~moe_edge.migration.replay`: the one replay pipeline (:func:`replay`) that
  ``experiments/migration.py``, ``experiments/migration_sweep.py`` and the ablations run.
"""
from moe_edge.migration.failure import (DEFAULT_STORAGE_BANDWIDTH, FailureReport, fail_server,
                                        failed_problem)
from moe_edge.migration.incremental import (full_replan, local_coverage,
                                            min_copies_for_coverage, objective_value,
                                            plan_incremental, replica_values)
from moe_edge.migration.schedule import (Move, MovePlan, MoveStep, apply_steps,
                                         hosted_at_every_moment, move_cost, move_sequence)
from moe_edge.migration.slots import (MigrationError, assign_slots_stable, changed_experts,
                                      placement_with_slots)
from moe_edge.migration.trigger import (SCORINGS, Decision, PrefixChoice, StepMix,
                                        choose_prefix, cross_validated_saving,
                                        cross_validated_savings, expected_latency, mix_latency,
                                        plan_prefix, prefix_grid, should_migrate,
                                        trigger_score)
