"""The base class of every moe-edge error (docs/DESIGN.md, "Errors").

Every error that moe-edge raises on bad input (ConfigError, PlacementError, CostError,
TraceError, CheckpointError, ...) derives from :class:`MoeEdgeError`. A script's command-line
wrapper catches ``MoeEdgeError`` and prints its one-line message; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations


class MoeEdgeError(ValueError):
  """Bad input to moe-edge: the message names the problem and the fix (one line)."""


class PlacementError(MoeEdgeError):
  """A placement is infeasible, inconsistent, or does not match the problem."""


class CostError(MoeEdgeError):
  """The cost model was given inputs that do not fit together."""
