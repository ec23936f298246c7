"""Regrouping a trace into the steps the cost model prices: prefill batches and decode batches
(docs/DESIGN.md, "Cost")."""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.core.trace import ActivationTrace
from moe_edge.core.errors import CostError


def _requests_by_server(trace: ActivationTrace) -> tuple[np.ndarray, np.ndarray]:
  """``(inv [T], rank [R])``: request index of every token, and each request's rank within its
  server's stream (requests ordered by their first token)."""
  lo, span = int(trace.request.min()), int(trace.request.max() - trace.request.min()) + 1
  key = trace.server.astype(np.int64) * span + (trace.request.astype(np.int64) - lo)
  uk, first, inv = np.unique(key, return_index=True, return_inverse=True)
  req_srv = trace.server[first]
  order = np.lexsort((first, req_srv))                # requests by server, then first token
  start = np.searchsorted(req_srv[order], req_srv[order], side="left")
  rank = np.empty(uk.size, dtype=np.int64)
  rank[order] = np.arange(uk.size) - start
  return inv.ravel(), rank


def prefill_batches(trace: ActivationTrace, requests_per_batch: int = 1) -> ActivationTrace:
  """The trace regrouped into prefill steps: each server's requests, in order of their first
  token, are cut into batches of ``requests_per_batch``; batch ``i`` of every server is step
  ``i`` (all prompt tokens of the batch are processed in that step)."""
  if requests_per_batch < 1:
    raise CostError(f"requests_per_batch must be >= 1, got {requests_per_batch}.")
  if trace.num_tokens == 0:
    return trace
  inv, rank = _requests_by_server(trace)
  return dataclasses.replace(trace, step=(rank // requests_per_batch)[inv].astype(np.int32))


def decode_batches(trace: ActivationTrace, batch_size: int) -> ActivationTrace:
  """The trace regrouped into decode steps with ``batch_size`` concurrent requests per server.

  Each server's requests (in order of their first token) are served in groups of
  ``batch_size`` (static batching): at every step each unfinished request of the current group
  emits its next token (tokens of a request keep their trace order); the next group starts when
  the longest request of the group is done. Servers run their groups concurrently, so step
  ``s`` holds, for every server, one token of each still-active request of its group.
  """
  if batch_size < 1:
    raise CostError(f"batch_size must be >= 1, got {batch_size}.")
  if trace.num_tokens == 0:
    return trace
  inv, rank = _requests_by_server(trace)
  order = np.argsort(inv, kind="stable")               # tokens grouped by request, trace order
  length = np.bincount(inv, minlength=rank.size)       # [R] tokens per request
  pos = np.empty(trace.num_tokens, dtype=np.int64)
  pos[order] = np.arange(trace.num_tokens) - np.repeat(np.cumsum(length) - length, length)
  _, first = np.unique(inv, return_index=True)
  req_srv = trace.server[first].astype(np.int64)
  group = rank // batch_size
  n_groups = int(group.max()) + 1
  glen = np.zeros(trace.num_servers * n_groups, dtype=np.int64)  # longest request per group
  np.maximum.at(glen, req_srv * n_groups + group, length)
  glen = glen.reshape(trace.num_servers, n_groups)
  offset = np.cumsum(glen, axis=1) - glen                # first step of each group
  step = offset[req_srv, group][inv] + pos
  return dataclasses.replace(trace, step=step.astype(np.int32))
