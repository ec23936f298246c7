"""A final choice among candidate placements by a judge: a short simulation on profiling requests.

The cost-model objective of ``latency_search`` (``moe_edge.cost.request_latency``) prices
expected steps at mean batch sizes with first-order queueing. The request-level simulator
(``moe_edge.serving.simulator``) samples each step's routing, forms its batches by continuous
batching and queues exactly; where the two disagree on which of two placements is faster, the
simulator is what a user measures. A deployment that can simulate itself hands methods a
``judge`` (``PlacementContext.judge``: placement -> mean request latency of a simulation on
*profiling* requests, a seed different from any evaluation); :func:`judged_choice` keeps the
candidate the judge finds fastest, the earlier candidate on ties, and records every candidate's
judged latency in ``info["judged"]``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement


def judged_choice(candidates: Sequence[Placement], judge: Callable[[Placement], float],
                  method: str) -> Placement:
  """The candidate with the lowest ``judge`` seconds, renamed ``method``.

  Args:
    candidates: placements of one problem; names (``Placement.method``) label them in
      ``info["judged"]`` (a repeated name gets ``#i``).
    judge: mean request latency (s) of a placement; ``inf`` for a queue that diverges.
  Returns:
    A copy of the winner with ``method`` set and ``info`` gaining ``judged`` ({label: s}) and
    ``judged_from`` (the winner's label); the winner's own ``info`` is kept.
  """
  if not candidates:
    raise PlacementError(f"{method}: judged_choice needs at least one candidate placement.")
  labels, scores = [], []
  for i, p in enumerate(candidates):
    label = p.method or f"candidate{i}"
    labels.append(label if label not in labels else f"{label}#{i}")
    s = float(judge(p))
    if math.isnan(s):
      raise PlacementError(f"{method}: the judge returned NaN for candidate {labels[-1]!r}; it "
                           f"must return a mean latency in seconds (inf for a diverging queue).")
    scores.append(s)
  best = min(range(len(scores)), key=lambda i: (scores[i], i))
  win = candidates[best]
  info = dict(win.info, judged=dict(zip(labels, scores)), judged_from=labels[best])
  return dataclasses.replace(win, method=method, info=info)
