"""Re-export of :mod:`moe_edge.core.sorting` (moved; this path works until the clean-up)."""
from moe_edge.core.sorting import stable_argsort_desc

__all__ = ["stable_argsort_desc"]
