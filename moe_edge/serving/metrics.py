"""One metrics schema for the engine and the simulator: ``requests.csv``, ``steps.csv`` and a
summary.

* ``requests.csv``: ``request, server, domain, arrival_s, first_token_s, finish_s,
  prompt_tokens, output_tokens``.
* ``steps.csv``: ``step, start_s, duration_s, prefill_tokens_<n>, decode_tokens_<n>`` (one
  column per server ``n``), ``cross_bytes`` (dispatch plus combine bytes between servers).
* the summary (``summary.json``): per-request ``ttft_ms`` (first_token - arrival), ``tpot_ms``
  ((finish - first_token) / (output_tokens - 1), requests of one output token excluded) and
  ``latency_ms`` (finish - arrival), each as mean, p50, p90, p99; ``tokens_per_s`` (output
  tokens over the span from the first arrival to the last finish); ``cross_bytes_per_token``
  (cross-server bytes over every token fed, prompt and decode).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

REQUEST_COLUMNS = ("request", "server", "domain", "arrival_s", "first_token_s", "finish_s",
                   "prompt_tokens", "output_tokens")


@dataclasses.dataclass(frozen=True)
class RequestRecord:
  """One served request (times in seconds on the serving clock)."""
  request: int
  server: int
  domain: str
  arrival_s: float
  first_token_s: float
  finish_s: float
  prompt_tokens: int
  output_tokens: int


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One cluster step: ``prefill_tokens [N]`` and ``decode_tokens [N]`` per server, the bytes
  that crossed servers (dispatch plus combine)."""
  step: int
  start_s: float
  duration_s: float
  prefill_tokens: tuple[int, ...]
  decode_tokens: tuple[int, ...]
  cross_bytes: int


def step_columns(num_servers: int) -> tuple[str, ...]:
  return (("step", "start_s", "duration_s")
          + tuple(f"prefill_tokens_{n}" for n in range(num_servers))
          + tuple(f"decode_tokens_{n}" for n in range(num_servers)) + ("cross_bytes",))


def _stats_ms(values_s: np.ndarray) -> dict:
  if values_s.size == 0:
    return dict(mean=float("nan"), p50=float("nan"), p90=float("nan"), p99=float("nan"))
  ms = 1e3 * values_s
  return dict(mean=float(ms.mean()), p50=float(np.percentile(ms, 50)),
              p90=float(np.percentile(ms, 90)), p99=float(np.percentile(ms, 99)))


def summarize(requests: Sequence[RequestRecord], steps: Sequence[StepRecord]) -> dict:
  """The summary of a serving run (module docstring)."""
  arr = np.array([r.arrival_s for r in requests])
  first = np.array([r.first_token_s for r in requests])
  fin = np.array([r.finish_s for r in requests])
  out = np.array([r.output_tokens for r in requests])
  multi = out > 1
  tpot = (fin[multi] - first[multi]) / (out[multi] - 1)
  fed = sum(sum(s.prefill_tokens) + sum(s.decode_tokens) for s in steps)
  cross = sum(s.cross_bytes for s in steps)
  span = float(fin.max() - arr.min()) if len(requests) else 0.0
  return dict(
      requests=len(requests), tokens_generated=int(out.sum()), steps=len(steps),
      ttft_ms=_stats_ms(first - arr), tpot_ms=_stats_ms(tpot), latency_ms=_stats_ms(fin - arr),
      tokens_per_s=float(out.sum() / span) if span > 0 else float("nan"),
      cross_bytes=int(cross), cross_bytes_per_token=float(cross / fed) if fed else 0.0,
      span_s=span)


def write_requests(path: Path, requests: Sequence[RequestRecord]) -> None:
  with Path(path).open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(REQUEST_COLUMNS)
    for r in sorted(requests, key=lambda r: r.request):
      w.writerow([getattr(r, c) if not c.endswith("_s") else repr(float(getattr(r, c)))
                  for c in REQUEST_COLUMNS])


def write_steps(path: Path, steps: Sequence[StepRecord], num_servers: int) -> None:
  with Path(path).open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(step_columns(num_servers))
    for s in steps:
      w.writerow([s.step, repr(float(s.start_s)), repr(float(s.duration_s)),
                  *s.prefill_tokens, *s.decode_tokens, s.cross_bytes])


def write_run(out_dir: str | Path, requests: Sequence[RequestRecord],
              steps: Sequence[StepRecord], num_servers: int, summary: dict) -> Path:
  """Write ``requests.csv``, ``steps.csv`` and ``summary.json`` into ``out_dir``."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  write_requests(out / "requests.csv", requests)
  write_steps(out / "steps.csv", steps, num_servers)
  (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
  return out


def read_requests(path: str | Path) -> list[RequestRecord]:
  with Path(path).open() as f:
    return [RequestRecord(int(r["request"]), int(r["server"]), r["domain"],
                          float(r["arrival_s"]), float(r["first_token_s"]),
                          float(r["finish_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
            for r in csv.DictReader(f)]


def read_steps(path: str | Path) -> list[StepRecord]:
  with Path(path).open() as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return []
  n = sum(1 for k in rows[0] if k.startswith("prefill_tokens_"))
  return [StepRecord(int(r["step"]), float(r["start_s"]), float(r["duration_s"]),
                     tuple(int(r[f"prefill_tokens_{i}"]) for i in range(n)),
                     tuple(int(r[f"decode_tokens_{i}"]) for i in range(n)),
                     int(r["cross_bytes"])) for r in rows]
