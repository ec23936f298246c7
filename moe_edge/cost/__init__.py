"""Cost model: latency, cross-server bytes and local coverage of a placement (model.py), with
compute terms calibrated from measured kernel times (calibrate.py)."""
from moe_edge.cost.calibrate import (Calibration, CalibrationError, KernelMeasurement,
                                     calibrate_local, fit_roofline, local_cluster,
                                     local_server_spec, measure_local, predicted_vs_measured)
from moe_edge.cost.model import (PHASES, CostError, CostReport, bytes_matrix, decode_batches,
                                 evaluate, expected_cost, prefill_batches)

__all__ = [
    "PHASES", "Calibration", "CalibrationError", "CostError", "CostReport", "KernelMeasurement",
    "bytes_matrix", "calibrate_local", "decode_batches", "evaluate", "expected_cost",
    "fit_roofline", "local_cluster", "local_server_spec", "measure_local",
    "predicted_vs_measured", "prefill_batches",
]
