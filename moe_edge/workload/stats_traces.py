"""Statistics-driven activation traces from routing counts of any model over any domains.

A :class:`~moe_edge.core.routing_stats.RoutingStats` file (format in docs/DESIGN.md) gives, per
domain, how often each expert was chosen at some recorded layers. Two real instances ship with
the data (``data_dir()/routing_stats/<model>_domain_counts.npz``, see
``third_party/olmoe_routing_and_corpus/README.md``, found by name): OLMoE-1B-7B (16 layers, 64
experts, top-8) and Mixtral-8x7B (32 layers, 8 experts, top-2), five domains each, layers 0, 7
and 15; a user's own file (another model, other or more domains) is given by path
(:func:`resolve_stats`). From them this module builds an
:class:`~moe_edge.workload.traces.ActivationTrace` at the real model's shape for any number of
servers, locality ``alpha`` and drift, so placement can be studied on real routing skew without
the real weights.

Construction (each step documented where it happens):

1. :func:`layer_distributions`: a per-domain expert distribution for *every* layer. Recorded
   layers are the measured ones; an unrecorded layer copies the nearest recorded layer with its
   experts relabelled by a fixed seeded permutation (no interpolation: expert identities are not
   aligned across layers, so mixing two layers' vectors would blend unrelated experts).
2. Domains: request ``i`` of server ``n`` (``request_len`` tokens, at step ``i``) draws one of the
   file's domains with :func:`moe_edge.workload.streams.draw_domains` (home domain with
   probability ``alpha``, the others uniformly; drift changes the homes), the same rule as the
   corpus streams; server ``i``'s home defaults to the file's domain ``i % D`` (round robin).
3. Experts: every token draws ``top_k`` distinct experts per layer, independently across tokens
   and layers given its domain, with the Gumbel-top-k trick on weights *calibrated* so that each
   expert's inclusion frequency equals the real one (:mod:`moe_edge.workload.sampling`).
4. Ranks and gates (the counts carry no gate values; this is a stand-in): the chosen experts are
   ordered by decreasing domain probability ``p`` and get gates ``p / sum(p over the k chosen)``,
   which decrease with rank and sum to one like a renormalised softmax.

Not used: ``cross`` / ``cross_top1`` (co-activation between layer pairs). They are rank-aligned
sums over two layer pairs only, not a joint distribution of the k-sets, so layers are sampled
independently given the domain; cross-layer correlation in these traces comes only from the
shared domain of a request. ``counts_top1`` is used only to validate the file; both are optional.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_edge.core.routing_stats import RoutingStats, StatsError
from moe_edge.workload.corpus import data_dir
from moe_edge.workload.sampling import calibrate_inclusion, gumbel_top_k
from moe_edge.workload.streams import DriftSchedule, default_homes, draw_domains, normalize_home
from moe_edge.workload.traces import ActivationTrace

STATS_MODELS = ("olmoe_1b_7b", "mixtral_8x7b")  # the shipped instances (found by name)
_CHUNK_ELEMENTS = 1 << 22  # token chunk size of the sampler: about 16 MB of float32 keys


def stats_path(name: str) -> Path:
  return data_dir() / "routing_stats" / f"{name}_domain_counts.npz"


@functools.lru_cache(maxsize=None)
def _load(name: str, path: str) -> RoutingStats:
  return RoutingStats.load(path, name)


def available_stats() -> list[str]:
  """Names of the routing-statistics files in ``<data_dir>/routing_stats/``."""
  folder = data_dir() / "routing_stats"
  return sorted(f.name.replace("_domain_counts.npz", "")
                for f in folder.glob("*_domain_counts.npz")) if folder.is_dir() else []


def resolve_stats(spec: "str | Path | RoutingStats") -> RoutingStats:
  """Routing statistics by name (a file of ``<data_dir>/routing_stats/``), by path (any
  ``.npz`` in the RoutingStats format; its name is the file's stem without
  ``_domain_counts``), or as given."""
  if isinstance(spec, RoutingStats):
    return spec
  p = Path(spec)
  if p.suffix == ".npz" or p.is_file() or len(p.parts) > 1:
    if not p.is_file():
      raise StatsError(f"no routing statistics file at {p}; give a RoutingStats .npz "
                       f"(docs/DESIGN.md) or one of the shipped names "
                       f"({', '.join(available_stats()) or 'none found'}).")
    return _load(p.stem.replace("_domain_counts", ""), str(p.resolve()))
  return load_routing_stats(str(spec))


def load_routing_stats(name: str, path: str | Path | None = None) -> RoutingStats:
  """Load and validate ``<data_dir>/routing_stats/<name>_domain_counts.npz`` (or ``path``).

  Loads are cached per file. Unknown names raise StatsError listing the files that exist.
  """
  p = Path(path) if path is not None else stats_path(name)
  if not p.is_file():
    have = sorted(f.name.replace("_domain_counts.npz", "")
                  for f in p.parent.glob("*_domain_counts.npz")) if p.parent.is_dir() else []
    raise StatsError(f"no routing statistics for {name!r} at {p}; available: "
                     f"{', '.join(have) or '(none)'} (expected {', '.join(STATS_MODELS)}).")
  return _load(name, str(p.resolve()))


# --------------------------------------------------------------------------------------------
# Per-layer distributions
# --------------------------------------------------------------------------------------------
def layer_plan(stats: RoutingStats, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """How every layer is filled: ``source [L] int`` (index into ``stats.layers``) and
  ``perm [L, E] int`` (expert ``e`` of the source layer becomes expert ``perm[l, e]``).

  ``source[l]`` is the recorded layer nearest to ``l`` (ties go to the earlier one). Recorded
  layers keep their own counts with the identity permutation; unrecorded layer ``l`` uses
  ``np.random.default_rng([seed, l]).permutation(E)``.
  """
  rec = np.asarray(stats.layers)
  l_all = np.arange(stats.num_layers)
  source = np.argmin(np.abs(l_all[:, None] - rec[None, :]), axis=1)  # argmin takes the first tie
  perm = np.empty((stats.num_layers, stats.num_experts), dtype=np.int64)
  for l in l_all:
    recorded = l in stats.layers
    perm[l] = (np.arange(stats.num_experts) if recorded else
               np.random.default_rng([seed, int(l)]).permutation(stats.num_experts))
  return source, perm


def _expand(per_recorded: np.ndarray, source: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """``[D, R, E]`` -> ``[D, L, E]`` with ``out[:, l, perm[l, e]] = x[:, source[l], e]``."""
  d, _, e = per_recorded.shape
  out = np.empty((d, len(source), e), dtype=per_recorded.dtype)
  for l, (s, p) in enumerate(zip(source, perm)):
    out[:, l, p] = per_recorded[:, s]
  return out


def layer_distributions(stats: RoutingStats, seed: int = 0) -> np.ndarray:
  """``[D, L, E]`` float64: each domain's expert distribution at every one of the ``L`` layers.

  Rows sum to one (share of token-choices; times ``top_k`` it is the inclusion frequency).
  Recorded layers are exactly the measured distributions. An unrecorded layer ``l`` is a copy of
  the nearest recorded layer (ties to the earlier: for recorded 0, 7, 15, layers 1-3 copy 0,
  4-11 copy 7, 12-31 copy 15) whose expert ids are relabelled by one fixed permutation per layer
  (seeded by ``(seed, l)``, the same for all domains); see :func:`layer_plan`. Consequences,
  which the tests check: every permutation-invariant statistic of a domain at layer ``l`` (its
  sorted distribution, entropy, hot-set coverage) and every between-domain statistic (the total
  variation distance, overlap of hot sets) equals that of the source layer exactly, while
  different layers do not share hot expert ids. No value is invented by interpolation.
  """
  source, perm = layer_plan(stats, seed)
  return _expand(stats.distributions(), source, perm)


@functools.lru_cache(maxsize=None)
def _calibrated(stats: RoutingStats) -> np.ndarray:
  """``[D, R, E]`` Plackett-Luce log weights whose top-k inclusion equals the real counts."""
  d, r, e = stats.counts.shape
  log_w = calibrate_inclusion(stats.inclusion().reshape(d * r, e), stats.top_k)
  return log_w.reshape(d, r, e)


def sampling_log_weights(stats: RoutingStats, seed: int = 0) -> np.ndarray:
  """``[D, L, E]`` log weights for Gumbel-top-k sampling: calibrated at the recorded layers,
  expanded like :func:`layer_distributions` (calibration commutes with relabelling)."""
  source, perm = layer_plan(stats, seed)
  return _expand(_calibrated(stats), source, perm)


def domain_tv(counts: np.ndarray) -> np.ndarray:
  """``[R, D, D]`` total-variation distance ``0.5 * sum_e |p_a - p_b|`` between the domains'
  expert distributions at each layer, from ``counts [D, R, E]``."""
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim != 3:
    raise StatsError(f"counts must be [D, R, E], got shape {counts.shape}.")
  p = counts / np.maximum(counts.sum(-1, keepdims=True), 1e-300)
  return 0.5 * np.abs(p[:, None] - p[None, :]).sum(-1).transpose(2, 0, 1)


def format_domain_tv(stats: RoutingStats) -> str:
  """Readable table of :func:`domain_tv` and the hottest expert's load at each recorded layer."""
  tv = domain_tv(stats.counts)
  dist = stats.distributions()
  d = len(stats.domains)
  iu = np.triu_indices(d, 1)
  lines = [f"{stats.name}: {stats.num_layers} layers, {stats.num_experts} experts, "
           f"top-{stats.top_k}; real counts of {int(stats.tokens_per_domain[0]):,} tokens per "
           f"domain at layers {list(stats.layers)}",
           "  total-variation distance between the domains' expert distributions (over domain "
           "pairs), and the hottest expert's load / mean load per domain:",
           f"  {'layer':>5}  {'TV min':>6}  {'TV mean':>7}  {'TV max':>6}  " +
           "  ".join(f"{n:>9}" for n in stats.domains)]
  for r, layer in enumerate(stats.layers):
    pairs = tv[r][iu]
    hot = dist[:, r].max(-1) * stats.num_experts
    lines.append(f"  {layer:>5}  {pairs.min():>6.3f}  {pairs.mean():>7.3f}  {pairs.max():>6.3f}  "
                 + "  ".join(f"{h:>8.1f}x" for h in hot))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sampling a trace
# --------------------------------------------------------------------------------------------
def sample_stats_trace(name: "str | Path | RoutingStats", num_servers: int,
                       tokens_per_server: int, alpha: float, seed: int,
                       home_domains: Sequence | None = None,
                       drift: DriftSchedule | None = None, request_len: int = 128,
                       layer_seed: int = 0) -> ActivationTrace:
  """A trace at the shape of the statistics' model for a cluster.

  Args:
    name: routing statistics (a shipped name such as ``olmoe_1b_7b``, a path, or a loaded
      :class:`RoutingStats`, see :func:`resolve_stats`); the trace's model is its name.
    num_servers: ``N``.
    tokens_per_server: tokens in each server's stream; split into requests of ``request_len``
      (the last one shorter when it does not divide).
    alpha: locality in [0, 1] (:mod:`moe_edge.workload.streams`).
    seed: randomness of domains and expert draws.
    home_domains: ``N`` homes among the file's domains (default: round robin over them).
    drift: home changes at request steps (its homes among the file's domains).
    request_len: tokens per request.
    layer_seed: seed of the expert relabelling of unrecorded layers (:func:`layer_plan`).

  Returns:
    An :class:`ActivationTrace` with ``T = N * tokens_per_server`` tokens in time order (by
    step, then server, then position), ``step`` = the request's index in its server's stream,
    model metadata ``name``. How experts, ranks and gates are drawn: module docstring.
  """
  if num_servers <= 0 or tokens_per_server <= 0 or request_len <= 0:
    raise StatsError(f"num_servers, tokens_per_server and request_len must be positive, got "
                     f"{num_servers}, {tokens_per_server}, {request_len}.")
  stats = resolve_stats(name)
  names = stats.domains
  log_w = sampling_log_weights(stats, layer_seed).astype(np.float32)  # [D, L, E]
  dist = layer_distributions(stats, layer_seed)  # [D, L, E]
  rng = np.random.default_rng(seed)

  n_req = -(-tokens_per_server // request_len)
  lengths = np.full(n_req, request_len)
  lengths[-1] = tokens_per_server - (n_req - 1) * request_len
  rows = np.stack(np.meshgrid(np.arange(num_servers), np.arange(n_req), indexing="xy"),
                  -1).reshape(-1, 2)  # [M, 2] (server, step), sorted by step then server
  req_domain = draw_domains(num_servers, rows, alpha, rng, home_domains, drift, names)  # [M]
  req_len = lengths[rows[:, 1]]
  server = np.repeat(rows[:, 0], req_len).astype(np.int32)
  step = np.repeat(rows[:, 1], req_len).astype(np.int32)
  request = np.repeat(np.arange(len(rows)), req_len).astype(np.int32)
  starts = np.cumsum(req_len) - req_len
  position = (np.arange(req_len.sum()) - np.repeat(starts, req_len)).astype(np.int32)
  domain = np.repeat(req_domain, req_len)

  t, l, k = len(server), stats.num_layers, stats.top_k
  ids = np.empty((t, l, k), dtype=np.int32)
  gates = np.empty((t, l, k), dtype=np.float32)
  chunk = max(1, _CHUNK_ELEMENTS // (l * stats.num_experts))
  for lo in range(0, t, chunk):
    dom = domain[lo:lo + chunk]
    pick = gumbel_top_k(log_w[dom], k, rng)  # [C, L, k]
    p = dist[dom[:, None, None], np.arange(l)[None, :, None], pick]  # [C, L, k]
    order = np.argsort(-p, axis=-1, kind="stable")
    ids[lo:lo + chunk] = np.take_along_axis(pick, order, axis=-1)
    p = np.take_along_axis(p, order, axis=-1)
    gates[lo:lo + chunk] = p / p.sum(-1, keepdims=True)

  homes = default_homes(num_servers, names) if home_domains is None else tuple(
      normalize_home(h, names) for h in home_domains)
  note = dict(generator="moe_edge.workload.stats_traces.sample_stats_trace", alpha=alpha,
              seed=seed, homes=[h if isinstance(h, str) else list(h) for h in homes],
              drift=drift.describe() if drift is not None else "", request_len=request_len,
              layer_seed=layer_seed,
              layer_source=[stats.layers[s] for s in layer_plan(stats, layer_seed)[0]])
  shipped = Path(stats.path).parent == (data_dir() / "routing_stats").resolve()
  source = (f"routing_stats/{Path(stats.path).name} (real counts, allenai/OLMoE 357454f)"
            if shipped else f"{stats.path} (routing statistics)")
  return ActivationTrace(expert_ids=ids, gate_weights=gates, server=server, request=request,
                         position=position, step=step, model=stats.name,
                         num_experts=stats.num_experts, num_servers=num_servers, source=source,
                         note=json.dumps(note))
