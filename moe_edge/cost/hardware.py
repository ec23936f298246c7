"""The cost model's hardware numbers and formulas: :class:`~moe_edge.core.hardware.Hardware`
(defined in ``moe_edge/core/hardware.py`` because every Placement's route table is built from
it; this is its path next to the cost model, docs/DESIGN.md "Cost")."""
from moe_edge.core.hardware import Hardware, HardwareError

__all__ = ["Hardware", "HardwareError"]
