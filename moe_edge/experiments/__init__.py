"""Reproducing the paper's tables and ablations (the library behind ``experiments/
reproduce_tables.py``, ``experiments/ablations.py`` and ``experiments/plot.py``).

Modules
-------
* :mod:`~moe_edge.experiments.config`: ``ExperimentConfig`` (typed, frozen) and its presets in
  ``configs/experiments/`` (``paper_tables``, ``demo``, ``ablations``).
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
"""
