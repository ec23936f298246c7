"""Re-export of :mod:`moe_edge.core.trace` (ActivationTrace moved to ``moe_edge/core/``; this
path keeps working until the final clean-up)."""
from moe_edge.core.trace import ActivationTrace, TraceError, concatenate

__all__ = ["ActivationTrace", "TraceError", "concatenate"]
