"""Cost model: latency, cross-server bytes and local coverage of a placement (model.py:
``CostModel``, ``evaluate``, ``expected_cost``), every formula a method of ``Hardware``
(hardware.py), compute terms calibrated from measured kernel times (calibrate.py)."""
from moe_edge.core.errors import CostError
from moe_edge.core.hardware import Hardware
from moe_edge.cost.batches import decode_batches, prefill_batches
from moe_edge.cost.calibrate import (Calibration, CalibrationError, KernelMeasurement,
                                     calibrate_local, fit_roofline, local_cluster,
                                     local_server_spec, measure_local, predicted_vs_measured)
from moe_edge.cost.model import PHASES, CostModel, CostReport, bytes_matrix, evaluate, expected_cost

__all__ = [
    "PHASES", "Calibration", "CalibrationError", "CostError", "CostModel", "CostReport",
    "Hardware", "KernelMeasurement", "bytes_matrix", "calibrate_local", "decode_batches",
    "evaluate", "expected_cost", "fit_roofline", "local_cluster", "local_server_spec",
    "measure_local", "predicted_vs_measured", "prefill_batches",
]
