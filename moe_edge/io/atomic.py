"""Atomic writes (re-exported from :mod:`moe_edge.core.atomic`, which holds them so that the
core types' savers, which import no layer above ``core``, write atomically too)."""
from moe_edge.core.atomic import (PARTIAL_TAG, atomic_directory, atomic_path, partial_siblings,
                                  remove, temp_sibling, write_bytes, write_json, write_text)

__all__ = ["PARTIAL_TAG", "atomic_directory", "atomic_path", "partial_siblings", "remove",
           "temp_sibling", "write_bytes", "write_json", "write_text"]
