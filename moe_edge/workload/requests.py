"""Request workloads for serving: who asks what, when, and for how many tokens.

A :class:`Requests` is the Requests format of ``docs/DESIGN.md``: per request its server,
arrival time (seconds), domain, prompt tokens and output length, in arrival order. Saved as
``.npz`` (prompts concatenated with offsets) or ``.jsonl`` (one request per line).

:func:`make_requests` draws a workload from the real corpus: arrivals per server are a Poisson
process with that server's rate (or all at time 0 with ``rate=inf``, or a given list of
``(server, time)``), each request's domain is drawn with the locality of
:mod:`moe_edge.workload.streams` (server ``i`` mostly serves ``DOMAINS[i % 5]`` with share
``alpha``), its prompt is a window of that domain's **held-out** text (so the model never
trained on it) and its output length is fixed or uniform in a range. Seeded: same arguments,
same workload.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_edge.workload.corpus import DOMAINS, CorpusError, load_corpus
from moe_edge.workload.streams import draw_domains


class RequestsError(CorpusError):
  """A request workload is malformed (unsorted arrivals, empty prompts, bad lengths)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Requests:
  """``R`` requests in arrival order.

  Attributes:
    server: ``[R] int32`` the server each request arrives at.
    arrival_s: ``[R] float64`` arrival times (seconds from the start), non-decreasing.
    domain: ``R`` domain names.
    prompts: ``R`` int32 token arrays (ragged).
    output_tokens: ``[R] int32`` tokens to generate (``>= 1``).
  """
  server: np.ndarray
  arrival_s: np.ndarray
  domain: tuple[str, ...]
  prompts: tuple[np.ndarray, ...]
  output_tokens: np.ndarray

  def __post_init__(self):
    r = len(self.prompts)
    for name in ("server", "arrival_s", "output_tokens", "domain"):
      if len(getattr(self, name)) != r:
        raise RequestsError(f"requests: {name} has {len(getattr(self, name))} entries but there "
                            f"are {r} prompts; give every field one entry per request.")
    t = np.asarray(self.arrival_s, np.float64)
    if r and (not np.all(np.isfinite(t)) or t.min() < 0):
      raise RequestsError("requests: arrival times must be finite and >= 0.")
    bad = np.flatnonzero(np.diff(t) < 0)
    if bad.size:
      i = int(bad[0]) + 1
      raise RequestsError(f"request {i} arrives at {t[i]:g} s, before request {i - 1} "
                          f"({t[i - 1]:g} s): arrival times must be sorted; sort the requests "
                          f"by arrival time.")
    for i, p in enumerate(self.prompts):
      if np.asarray(p).ndim != 1 or len(p) < 1:
        raise RequestsError(f"request {i} has an empty or non-1-D prompt; give it at least one "
                            f"token.")
    out = np.asarray(self.output_tokens)
    if r and out.min() < 1:
      i = int(np.argmin(out))
      raise RequestsError(f"request {i} asks for {int(out[i])} output tokens; ask for at "
                          f"least 1.")

  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def prompt_tokens(self) -> np.ndarray:
    """``[R] int64`` prompt lengths."""
    return np.array([len(p) for p in self.prompts], dtype=np.int64)

  def save(self, path: str | Path) -> Path:
    """Write ``.npz`` or ``.jsonl`` (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
      with path.open("w") as f:
        for i in range(len(self)):
          f.write(json.dumps(dict(server=int(self.server[i]),
                                  arrival_s=float(self.arrival_s[i]), domain=self.domain[i],
                                  prompt=[int(x) for x in self.prompts[i]],
                                  output_tokens=int(self.output_tokens[i]))) + "\n")
      return path
    if path.suffix != ".npz":
      raise RequestsError(f"unknown requests file type {path.suffix!r}; use .npz or .jsonl.")
    lens = self.prompt_tokens
    np.savez(path, server=self.server, arrival_s=self.arrival_s,
             domain=np.array(self.domain, dtype=str),
             prompt_tokens=np.concatenate(self.prompts).astype(np.int32),
             prompt_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
             output_tokens=self.output_tokens)
    return path

  @classmethod
  def load(cls, path: str | Path) -> "Requests":
    path = Path(path)
    if not path.is_file():
      raise RequestsError(f"no requests file at {path}.")
    if path.suffix == ".jsonl":
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
      return cls(server=np.array([r["server"] for r in rows], np.int32),
                 arrival_s=np.array([r["arrival_s"] for r in rows], np.float64),
                 domain=tuple(r["domain"] for r in rows),
                 prompts=tuple(np.array(r["prompt"], np.int32) for r in rows),
                 output_tokens=np.array([r["output_tokens"] for r in rows], np.int32))
    with np.load(path) as z:
      off = z["prompt_offsets"]
      toks = z["prompt_tokens"]
      return cls(server=z["server"].astype(np.int32),
                 arrival_s=z["arrival_s"].astype(np.float64),
                 domain=tuple(str(d) for d in z["domain"]),
                 prompts=tuple(toks[off[i]:off[i + 1]] for i in range(len(off) - 1)),
                 output_tokens=z["output_tokens"].astype(np.int32))


def poisson_arrivals(rates: Sequence[float], rng: np.random.Generator,
                     requests_per_server: int | None = None,
                     duration_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(server [R], time [R])`` sorted by time: a Poisson process per server with
  ``rates[n]`` requests/s (``inf``: every request at time 0), either ``requests_per_server``
  arrivals each or every arrival before ``duration_s``."""
  if (requests_per_server is None) == (duration_s is None):
    raise RequestsError("give exactly one of requests_per_server and duration_s.")
  servers, times = [], []
  for n, rate in enumerate(rates):
    if not rate > 0:
      raise RequestsError(f"server {n}'s arrival rate is {rate}; it must be > 0 requests/s "
                          f"(inf: all at time 0).")
    if requests_per_server is not None:
      t = (np.zeros(requests_per_server) if math.isinf(rate)
           else np.cumsum(rng.exponential(1.0 / rate, requests_per_server)))
    else:
      if math.isinf(rate):
        raise RequestsError("an infinite rate needs requests_per_server, not duration_s.")
      t = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s * 1.5 + 20)))
      while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, t.size))])
      t = t[t < duration_s]
    servers.append(np.full(t.size, n))
    times.append(t)
  server, time = np.concatenate(servers), np.concatenate(times)
  order = np.lexsort((server, time))
  return server[order].astype(np.int32), time[order]


def _lengths(spec, count: int, rng: np.random.Generator, what: str) -> np.ndarray:
  """``count`` lengths: ``spec`` an int (fixed) or ``(lo, hi)`` (uniform, inclusive)."""
  if isinstance(spec, (int, np.integer)):
    lo = hi = int(spec)
  else:
    lo, hi = (int(v) for v in spec)
  if not 1 <= lo <= hi:
    raise RequestsError(f"{what} must be >= 1 (a fixed length or lo <= hi), got {spec!r}.")
  return rng.integers(lo, hi + 1, size=count).astype(np.int32)


def make_requests(num_servers: int, prompt_tokens, output_tokens, seed: int,
                  rate: float | Sequence[float] = math.inf,
                  requests_per_server: int | None = None, duration_s: float | None = None,
                  arrivals: tuple[Sequence[int], Sequence[float]] | None = None,
                  alpha: float = 0.8, home_domains: Sequence | None = None,
                  split: str = "heldout") -> Requests:
  """A seeded workload from the real corpus (module docstring).

  Args:
    num_servers: ``N``.
    prompt_tokens: prompt length, fixed (int) or uniform in ``(lo, hi)``.
    output_tokens: output length, fixed or uniform in ``(lo, hi)``.
    seed: the only source of randomness.
    rate: arrivals per second per server (one value or ``N``); ``inf``: all at time 0.
    requests_per_server, duration_s: how many arrivals (exactly one of them, unless
      ``arrivals`` is given).
    arrivals: a given list ``(servers [R], times [R])`` instead of the Poisson process.
    alpha, home_domains: locality of the domains (:func:`moe_edge.workload.streams.
      draw_domains`).
    split: corpus split of the prompts (``"heldout"`` by default).
  """
  rng = np.random.default_rng(seed)
  if arrivals is not None:
    server = np.asarray(arrivals[0], np.int32)
    time = np.asarray(arrivals[1], np.float64)
    if server.shape != time.shape:
      raise RequestsError(f"arrivals: {server.size} servers but {time.size} times.")
    bad = np.flatnonzero((server < 0) | (server >= num_servers))
    if bad.size:
      raise RequestsError(f"request {int(bad[0])} is for server {int(server[bad[0]])}, but the "
                          f"cluster has servers 0..{num_servers - 1}.")
  else:
    rates = [float(rate)] * num_servers if np.ndim(rate) == 0 else [float(r) for r in rate]
    if len(rates) != num_servers:
      raise RequestsError(f"rate has {len(rates)} entries for {num_servers} servers.")
    server, time = poisson_arrivals(rates, rng, requests_per_server, duration_s)
  r = server.size
  doms = draw_domains(num_servers, np.stack([server, np.zeros(r, np.int64)], axis=1), alpha,
                      rng, home_domains)
  plen = _lengths(prompt_tokens, r, rng, "prompt_tokens")
  olen = _lengths(output_tokens, r, rng, "output_tokens")
  corpus = load_corpus(split)
  prompts = []
  for i in range(r):
    text = corpus[DOMAINS[doms[i]]]
    if len(text) < plen[i]:
      raise RequestsError(f"request {i}: a {plen[i]}-token prompt is longer than the {split} "
                          f"text of {DOMAINS[doms[i]]} ({len(text)} tokens).")
    start = int(rng.integers(0, len(text) - plen[i] + 1))
    prompts.append(np.array(text[start:start + plen[i]], dtype=np.int32))
  return Requests(server=server, arrival_s=time, domain=tuple(DOMAINS[d] for d in doms),
                  prompts=tuple(prompts), output_tokens=olen)
