"""The library behind the experiment scripts (``experiments/reproduce_tables.py``,
``ablations.py``, ``plot.py``, ``migration.py``, ``migration_sweep.py``, ``substitution_sweep.py``,
``budget_sweep.py``).

Modules
-------
* :mod:`~moe_edge.experiments.config`: ``ExperimentConfig`` (typed, frozen), built from the
  ConfigDicts of its presets in ``configs/experiments/`` (``edge_tables``, ``demo``,
  ``ablations``; ``experiment_preset``, ``build_experiment``).
* :mod:`~moe_edge.experiments.workloads`: profiling / evaluation traces per model
  (statistics-driven, recorded from the small model, or mapped from it).
* :mod:`~moe_edge.experiments.trace_mapping`: small-model traces at a larger model's shape.
* :mod:`~moe_edge.experiments.calibration`: which calibration the latencies use.
* :mod:`~moe_edge.experiments.costing`: place every registered method on one workload with one
  calibrated problem and context, and cost it (``cost_methods``; also ``experiments/place.py``).
* :mod:`~moe_edge.experiments.tables`: compute, compose and format the tables (``run_tables``,
  ``run_demo_tables``); :mod:`~moe_edge.experiments.headline`: each ``ours`` method against the
  ``baseline`` methods and the ``oracle`` (roles from the placement registry).
* :mod:`~moe_edge.experiments.sweeps`: the ablation sweeps.
* :mod:`~moe_edge.experiments.crosscheck`: cost model vs the real dispatch on host devices.
* :mod:`~moe_edge.experiments.plots`, :mod:`~moe_edge.experiments.progress`: figures and a
  progress display.
* :mod:`~moe_edge.experiments.migration_run` (``MigrationRun``: settings, workload, the replay of
  :mod:`moe_edge.migration.replay`, costing, recovery goal, failure drill),
  :mod:`~moe_edge.experiments.migration_report` (files and console tables),
  :mod:`~moe_edge.experiments.migration_sweep` (seeds x drifts x budgets, in process).
* :mod:`~moe_edge.experiments.extension_settings`: the extension sweeps' frozen settings.
"""
