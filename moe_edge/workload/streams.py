"""Per-server request streams with a locality knob and drift.

Server ``n`` has a *home*: one domain, or a mix (a probability vector ``p`` over the domains). The
domains are a parameter (``domains``) of every function here: the corpus's own
(:data:`moe_edge.workload.corpus.DOMAINS`, read when called) by default, or those of a
routing-statistics file (:mod:`moe_edge.workload.stats_traces`: any number, any names). A request of
server ``n`` comes from domain ``d`` with probability

  ``q[n, d] = alpha * p[d] + (1 - alpha) * (1 - p[d]) / (D - 1)``

so with a single home domain, a share ``alpha`` of the requests comes from it and the rest
uniformly from the other ``D - 1`` domains (``alpha = 1``: perfect locality; ``alpha = 1 / D``:
no locality; ``alpha = 0``: never the home domain). A mix home generalises this (a uniform mix
gives uniform traffic for every ``alpha``). A :class:`DriftSchedule` changes the homes at given
steps; a request's domain is drawn with the homes in force at its step.

A request is a random window of ``seq_len`` byte tokens of its domain's text (by default the
held-out split, so a model trained on the train split is not replayed on its training data).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Union

import numpy as np

from moe_edge.workload import corpus as corpus_lib
from moe_edge.workload.corpus import CorpusError, load_corpus

Home = Union[str, tuple[float, ...]]  # a domain name, or a probability vector over the domains


class StreamError(CorpusError):
  """A request-stream specification is malformed."""


def domain_names(domains: Sequence[str] | None = None) -> tuple[str, ...]:
  """``domains`` as a tuple, or the corpus's domains when None."""
  return corpus_lib.DOMAINS if domains is None else tuple(domains)


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
  """One request: ``tokens [S] int32`` of ``domain`` that arrives at ``server`` at ``step``.

  ``request_id`` is unique across servers (the index in :func:`make_streams`' output).
  """
  server: int
  request_id: int
  domain: str
  tokens: np.ndarray
  step: int

  @property
  def domain_id(self) -> int:
    """Index of the request's domain among the corpus's domains."""
    return corpus_lib.domain_id(self.domain)


# --------------------------------------------------------------------------------------------
# Homes and drift
# --------------------------------------------------------------------------------------------
def normalize_home(home, domains: Sequence[str] | None = None) -> Home:
  """A domain name stays a name; a mix (``{domain: weight}`` or ``D`` weights in ``domains``
  order) becomes a tuple of ``D`` probabilities (non-negative weights, normalised to sum to
  one)."""
  names = domain_names(domains)
  if isinstance(home, str):
    if home not in names:
      raise StreamError(f"unknown home domain {home!r}; use one of {', '.join(names)} or a "
                        f"mix such as {{'{names[0]}': 0.5, '{names[-1]}': 0.5}}.")
    return home
  if isinstance(home, Mapping):
    unknown = [k for k in home if k not in names]
    if unknown:
      raise StreamError(f"mix names unknown domains {unknown}; use {', '.join(names)}.")
    w = np.array([float(home.get(d, 0.0)) for d in names])
  else:
    w = np.asarray(home, dtype=np.float64)
    if w.shape != (len(names),):
      raise StreamError(f"a mix home must have one weight per domain ({len(names)}: "
                        f"{', '.join(names)}), got shape {w.shape}.")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise StreamError(f"mix weights must be finite, non-negative and not all zero, got "
                      f"{w.tolist()}.")
  return tuple(float(x) for x in w / w.sum())


def home_vector(home: Home, domains: Sequence[str] | None = None) -> np.ndarray:
  """``[D]`` float64 probability vector of a (normalised) home."""
  names = domain_names(domains)
  if isinstance(home, str):
    return np.eye(len(names))[names.index(home)]
  return np.asarray(home, dtype=np.float64)


def default_homes(num_servers: int, domains: Sequence[str] | None = None) -> tuple[Home, ...]:
  """Server ``i`` lives at ``domains[i % D]`` (round robin)."""
  names = domain_names(domains)
  return tuple(names[i % len(names)] for i in range(num_servers))


def domain_probabilities(homes: Sequence[Home], alpha: float,
                         domains: Sequence[str] | None = None) -> np.ndarray:
  """``q [N, D]`` float64: probability that a request of server ``n`` is from domain ``d``
  (formula in the module docstring; one domain: every request is from it)."""
  names = domain_names(domains)
  check_alpha(alpha, len(names))
  p = np.stack([home_vector(normalize_home(h, names), names) for h in homes])
  d = p.shape[1]
  if d == 1:
    return p
  return alpha * p + (1.0 - alpha) * (1.0 - p) / (d - 1)


def check_alpha(alpha: float, num_domains: int | None = None) -> None:
  d = len(domain_names()) if num_domains is None else num_domains
  if not (np.isfinite(alpha) and 0.0 <= alpha <= 1.0):
    raise StreamError(f"alpha (the share of a server's requests from its home domain) must be "
                      f"in [0, 1], got {alpha}; alpha = {1 / d:g} means no locality.")


def _parse_home(text: str):
  """``"c4"`` -> ``"c4"``; ``"arxiv=0.7+c4=0.3"`` -> ``{"arxiv": 0.7, "c4": 0.3}``."""
  if "=" not in text:
    return text
  mix = {}
  for term in text.split("+"):
    name, _, weight = term.partition("=")
    try:
      mix[name.strip()] = float(weight)
    except ValueError:
      raise StreamError(f"bad mix weight in {text!r}; write e.g. 'arxiv=0.7+c4=0.3'.") from None
  return mix


@dataclasses.dataclass(frozen=True)
class DriftSchedule:
  """Home changes over time: ``changes = ((step, homes), ...)``, steps increasing.

  From ``step`` on (until the next change), server ``i``'s home is ``homes[i]``: a domain name or
  a mix (normalised by :func:`normalize_home` over ``domains``, default the corpus's). Before the
  first change the initial homes hold.
  """
  changes: tuple[tuple[int, tuple[Home, ...]], ...]
  domains: tuple[str, ...] | None = None

  def __post_init__(self):
    norm, last = [], -1
    for entry in self.changes:
      if len(entry) != 2:
        raise StreamError(f"a drift change is (step, homes), got {entry!r}.")
      step, homes = entry
      if int(step) != step or step < 0:
        raise StreamError(f"drift steps must be non-negative integers, got {step!r}.")
      if step <= last:
        raise StreamError(f"drift steps must increase strictly, got {step} after {last}.")
      if isinstance(homes, str) or not len(homes):
        raise StreamError(f"drift change at step {step} needs one home per server (a sequence), "
                          f"got {homes!r}.")
      norm.append((int(step), tuple(normalize_home(h, self.domains) for h in homes)))
      last = step
    object.__setattr__(self, "changes", tuple(norm))

  @classmethod
  def parse(cls, text: str, domains: Sequence[str] | None = None) -> "DriftSchedule":
    """Parse ``"step:home0,home1,...;step:..."``; a home is a domain or a mix
    ``"arxiv=0.7+c4=0.3"``. Example: ``"50:book,c4,github,wikipedia"``."""
    changes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
      step, sep, homes = part.partition(":")
      if not sep or not step.strip().isdigit():
        raise StreamError(f"cannot parse drift change {part!r}; expected "
                          f"'step:home0,home1,...' such as '50:book,c4,github,wikipedia'.")
      changes.append((int(step), tuple(_parse_home(h.strip()) for h in homes.split(","))))
    if not changes:
      raise StreamError(f"drift spec {text!r} has no changes.")
    return cls(tuple(changes), None if domains is None else tuple(domains))

  def check_servers(self, num_servers: int) -> None:
    for step, homes in self.changes:
      if len(homes) != num_servers:
        raise StreamError(f"drift change at step {step} gives {len(homes)} homes for "
                          f"{num_servers} servers; give one home per server.")

  def homes_at(self, step: int, initial: Sequence[Home]) -> tuple[Home, ...]:
    """Homes in force at ``step``."""
    homes = tuple(initial)
    for s, h in self.changes:
      if s <= step:
        homes = h
    return homes

  def describe(self) -> str:
    """The inverse of :meth:`parse` (mixes written with their normalised weights)."""
    def one(h):
      if isinstance(h, str):
        return h
      return "+".join(f"{d}={w:g}" for d, w in zip(domain_names(self.domains), h) if w > 0)
    return ";".join(f"{s}:" + ",".join(one(h) for h in homes) for s, homes in self.changes)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------
def request_steps(requests_per_server: int, steps: int | None) -> np.ndarray:
  """``[R]`` int: the step of each of a server's requests (``i``, or spread over ``steps``)."""
  i = np.arange(requests_per_server)
  if steps is None:
    return i
  if steps <= 0:
    raise StreamError(f"steps must be positive, got {steps}.")
  return (i * steps) // requests_per_server


def draw_domains(num_servers: int, server_steps: np.ndarray, alpha: float,
                 rng: np.random.Generator, home_domains: Sequence | None = None,
                 drift: DriftSchedule | None = None,
                 domains: Sequence[str] | None = None) -> np.ndarray:
  """Domain ids ``[M]`` (indices into ``domains``, default the corpus's) for requests with
  ``server_steps [M, 2]`` = (server, step) rows."""
  names = domain_names(domains)
  if num_servers <= 0:
    raise StreamError(f"num_servers must be positive, got {num_servers}.")
  homes = default_homes(num_servers, names) if home_domains is None else tuple(home_domains)
  if len(homes) != num_servers:
    raise StreamError(f"home_domains has {len(homes)} entries for {num_servers} servers; give "
                      f"one home per server.")
  homes = tuple(normalize_home(h, names) for h in homes)
  check_alpha(alpha, len(names))
  if drift is not None:
    drift.check_servers(num_servers)
  server, step = server_steps[:, 0], server_steps[:, 1]
  q = np.empty((len(server), len(names)))
  bounds = [0] + ([s for s, _ in drift.changes] if drift is not None else [])
  for lo_step in sorted(set(bounds)):
    sel = step >= lo_step
    hs = drift.homes_at(lo_step, homes) if drift is not None else homes
    q[sel] = domain_probabilities(hs, alpha, names)[server[sel]]
  cdf = np.cumsum(q, axis=1)
  u = rng.random(len(server)) * cdf[:, -1]
  return np.minimum((u[:, None] >= cdf).sum(axis=1), len(names) - 1).astype(np.int32)


def make_streams(num_servers: int, requests_per_server: int, seq_len: int, alpha: float,
                 seed: int, split: str = "heldout", home_domains: Sequence | None = None,
                 drift: DriftSchedule | None = None, steps: int | None = None) -> list[Request]:
  """Requests of ``num_servers`` servers, ``requests_per_server`` each, in time order.

  Args:
    num_servers: ``N``.
    requests_per_server: ``R`` requests per server.
    seq_len: tokens per request ``S``.
    alpha: locality in [0, 1] (module docstring).
    seed: the only source of randomness; same arguments, same streams.
    split: corpus split the windows come from (``"heldout"`` or ``"train"``).
    home_domains: ``N`` homes (domain names or mixes); default server ``i`` -> the corpus's
      domain ``i % 5``.
    drift: home changes over steps.
    steps: request ``i`` of a server is at step ``i`` (default) or ``floor(i * steps / R)``.

  Returns:
    ``N * R`` :class:`Request` sorted by (step, server); ``request_id`` is the list index.
  """
  if requests_per_server <= 0 or seq_len <= 0:
    raise StreamError(f"requests_per_server and seq_len must be positive, got "
                      f"{requests_per_server} and {seq_len}.")
  corpus = load_corpus(split)
  short = {d: len(t) for d, t in corpus.items() if len(t) < seq_len}
  if short:
    raise StreamError(f"seq_len={seq_len} is longer than the {split} text of {short} (tokens); "
                      f"use a shorter seq_len or the train split.")
  rng = np.random.default_rng(seed)
  per = request_steps(requests_per_server, steps)  # [R]
  rows = np.stack([np.repeat(np.arange(num_servers), requests_per_server),
                   np.tile(per, num_servers)], axis=1)  # [N * R, 2] (server, step)
  rows = rows[np.lexsort((rows[:, 0], rows[:, 1]))]  # by step, then server (stable)
  names = domain_names()
  doms = draw_domains(num_servers, rows, alpha, rng, home_domains, drift, names)
  out = []
  for rid, ((n, s), d) in enumerate(zip(rows, doms)):
    text = corpus[names[d]]
    start = int(rng.integers(0, len(text) - seq_len + 1))
    out.append(Request(server=int(n), request_id=rid, domain=names[d],
                       tokens=np.array(text[start:start + seq_len], dtype=np.int32), step=int(s)))
  return out
