"""Errors of the serving runtime (:mod:`moe_edge.parallel.runtime`)."""
from moe_edge.core.errors import MoeEdgeError


class ServingError(MoeEdgeError):
  """A request, placement or migration does not fit the running cluster."""


class UnreachableExpertError(ServingError):
  """Tokens picked an expert that only a failed server held (until it is re-loaded)."""
