"""Expert kernels: the grouped SwiGLU FFN every expert path runs (``grouped_ffn.py``)."""
from moe_edge.kernels.grouped_ffn import (BACKENDS, TOKAMAX_HEURISTIC, KernelError,
                                          MosaicConfig, ffn_backend,
                                          fuse_gate_up, grouped_ffn, mosaic_config,
                                          mosaic_unavailable,
                                          select_backend, sort_by_group, split_gate_up,
                                          tokamax_version)

__all__ = ["BACKENDS", "TOKAMAX_HEURISTIC", "KernelError", "MosaicConfig", "ffn_backend",
           "fuse_gate_up", "grouped_ffn", "mosaic_config", "mosaic_unavailable", "select_backend",
           "sort_by_group", "split_gate_up", "tokamax_version"]
