"""What a serving run reports beyond the metrics schema: equality with the single-device cached
model, local coverage of the routing, and the printed summary (shared by ``experiments/
serve.py`` and ``experiments/demo.py``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_edge.model.decoding import generate_cached
from moe_edge.model.transformer import MoETransformer
from moe_edge.placement.problem import Placement
from moe_edge.serving.engine import StepRouting
from moe_edge.workload.requests import Requests


def single_device_tokens(model: MoETransformer, requests: Requests,
                         batch: int = 16) -> list[np.ndarray]:
  """Every request's greedy output from :func:`generate_cached` on one device (batches of
  ``batch`` requests; each batch runs to its longest output, then each is cut to its own)."""
  out: list[np.ndarray] = []
  for lo in range(0, len(requests), batch):
    idx = range(lo, min(lo + batch, len(requests)))
    longest = int(max(requests.output_tokens[i] for i in idx))
    got = generate_cached(model, [requests.prompts[i] for i in idx], longest)
    out.extend(got[j, :int(requests.output_tokens[i])] for j, i in enumerate(idx))
  return out


def tokens_equal(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> list[int]:
  """Requests whose tokens differ (empty when every token is equal)."""
  return [i for i, (a, b) in enumerate(zip(got, want)) if not np.array_equal(a, b)]


def coverage(routing: Sequence[StepRouting], placement_at_step: Sequence[Placement]) -> float:
  """Fraction of fed tokens' expert choices computed on the token's own server, with each
  step's routing on the placement that served it."""
  local = total = 0
  for r, p in zip(routing, placement_at_step):
    if r.server.size == 0:
      continue
    l = np.arange(r.expert_ids.shape[1])[None, :, None]
    dest = p.route[r.server[:, None, None], l, r.expert_ids]
    local += int((dest == r.server[:, None, None]).sum())
    total += dest.size
  return local / total if total else 1.0


def format_summary(s: dict) -> str:
  """A few lines: latency percentiles, throughput, bytes, coverage, the equality verdict."""
  def row(name: str, key: str) -> str:
    v = s[key]
    return (f"  {name:<8} mean {v['mean']:9.1f}  p50 {v['p50']:9.1f}  p90 {v['p90']:9.1f}  "
            f"p99 {v['p99']:9.1f}  ms")
  lines = [
      f"served {s['requests']} requests ({s['tokens_generated']} tokens) in {s['steps']} steps "
      f"on {s['servers']} servers, placement {s['method']}, clock {s['clock']}",
      row("TTFT", "ttft_ms"), row("TPOT", "tpot_ms"), row("latency", "latency_ms"),
      f"  {s['tokens_per_s']:.1f} tokens/s; local coverage {s['coverage']:.3f}; "
      f"{s['cross_bytes_per_token']:.1f} cross-server bytes per fed token "
      f"({'=' if s['bytes_equal_cost_model'] else '!='} cost model)",
      f"  tokens equal to the single-device cached model: "
      f"{'yes' if s['equal_to_single_device'] else 'NO'}",
  ]
  return "\n".join(lines)
