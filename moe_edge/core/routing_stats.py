"""RoutingStats: measured routing counts of one model over any number of domains.

The ``.npz`` format (docs/DESIGN.md, "Data formats")::

  domains     [D] str        domain names (any number, any names, distinct)
  layers      [R] int        recorded layer indices, increasing, inside [0, num_layers)
  num_layers, num_experts, top_k   the model's L, E, k
  counts      [D, R, E] int  token-choices per expert (all k ranks)
  optional:
  counts_top1 [D, R, E] int  first choices only
  cross_pairs [P, 2] int     recorded layer pairs (a, b)
  cross       [D, P, E, E]   rank-aligned co-activation of the pair (marginals = counts)
  cross_top1  [D, P, E, E]   the same for first choices

Any model and any domains: the shipped OLMoE-1B-7B and Mixtral-8x7B files
(``<data>/routing_stats/<name>_domain_counts.npz``) are two instances, found by name
(:func:`moe_edge.workload.stats_traces.resolve_stats`); a user's own file is loaded by path.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moe_edge.config import ConfigError, model_config
from moe_edge.core.errors import MoeEdgeError

REQUIRED = ("domains", "layers", "num_layers", "num_experts", "top_k", "counts")
OPTIONAL = ("counts_top1", "cross_pairs", "cross", "cross_top1")


class StatsError(MoeEdgeError):
  """A routing-statistics file is missing or malformed, or a request for a trace is."""


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingStats:
  """Measured routing counts of one model over ``D`` domains (module docstring).

  Attributes:
    name: model name (``configs/models/<name>.py`` when such a preset exists).
    path: the file it was read from.
    domains: ``D`` distinct domain names.
    layers: ``R`` recorded layer indices, increasing.
    num_layers, num_experts, top_k: the model's ``L``, ``E``, ``k``.
    counts: ``[D, R, E]`` int64 token-choices per expert (all k ranks).
    counts_top1: ``[D, R, E]`` int64 first choices only, or None.
    cross_pairs: ``P`` recorded layer pairs ``(a, b)`` (empty without cross counts).
    cross: ``[D, P, E, E]`` int64 rank-aligned co-activation, or None.
    cross_top1: ``[D, P, E, E]`` int64 the same for first choices, or None.
  """
  name: str
  path: str
  domains: tuple[str, ...]
  layers: tuple[int, ...]
  num_layers: int
  num_experts: int
  top_k: int
  counts: np.ndarray
  counts_top1: np.ndarray | None = None
  cross_pairs: tuple[tuple[int, int], ...] = ()
  cross: np.ndarray | None = None
  cross_top1: np.ndarray | None = None

  def __post_init__(self):
    self.validate()

  @property
  def num_domains(self) -> int:
    return len(self.domains)

  @property
  def tokens_per_domain(self) -> np.ndarray:
    """``[D]`` int64 tokens measured per domain (every token makes ``top_k`` choices)."""
    return self.counts[:, 0].sum(-1) // self.top_k

  def domain_index(self, name: str) -> int:
    """Index of domain ``name``; unknown names raise StatsError listing the file's domains."""
    if name not in self.domains:
      raise StatsError(f"unknown domain {name!r}; routing stats {Path(self.path).name} have "
                       f"{', '.join(self.domains)}.")
    return self.domains.index(name)

  def distributions(self) -> np.ndarray:
    """``[D, R, E]`` float64 share of token-choices per expert (rows sum to one)."""
    c = self.counts.astype(np.float64)
    return c / c.sum(-1, keepdims=True)

  def inclusion(self) -> np.ndarray:
    """``[D, R, E]`` float64 fraction of tokens that pick each expert (rows sum to ``top_k``)."""
    return self.counts / self.tokens_per_domain[:, None, None].astype(np.float64)

  def validate(self) -> None:
    """Check shapes and the count identities; raise StatsError naming the problem."""
    where = f"routing stats {self.path}"
    d, r, e, k = len(self.domains), len(self.layers), self.num_experts, self.top_k
    if d == 0 or len(set(self.domains)) != d:
      raise StatsError(f"{where}: domains {list(self.domains)} must be one or more distinct "
                       f"names.")
    if not 0 < k <= e:
      raise StatsError(f"{where}: need 0 < top_k <= num_experts, got top_k={k}, E={e}.")
    lay = np.asarray(self.layers)
    if r == 0 or np.any(np.diff(lay) <= 0) or lay[0] < 0 or lay[-1] >= self.num_layers:
      raise StatsError(f"{where}: recorded layers {list(self.layers)} must be increasing and "
                       f"inside [0, {self.num_layers}).")
    p = len(self.cross_pairs)
    for key, shape in (("counts", (d, r, e)), ("counts_top1", (d, r, e)),
                       ("cross", (d, p, e, e)), ("cross_top1", (d, p, e, e))):
      a = getattr(self, key)
      if a is None:
        continue
      if a.shape != shape:
        raise StatsError(f"{where}: {key} has shape {a.shape}, expected {shape}.")
      if not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
        raise StatsError(f"{where}: {key} must hold non-negative integer counts.")
    self._check_counts(where)
    self._check_cross(where)
    try:
      cfg = model_config(self.name)
    except ConfigError:
      return  # no preset of this name: nothing to compare with
    want = (cfg.n_moe_layers, cfg.n_experts, cfg.top_k)
    if want != (self.num_layers, e, k):
      raise StatsError(f"{where}: shape (L, E, k) = {(self.num_layers, e, k)} differs from "
                       f"configs/models/{self.name}.py {want}.")

  def _check_counts(self, where: str) -> None:
    k = self.top_k
    sums = self.counts.sum(-1)  # [D, R] = k * tokens
    if np.any(sums != sums[:, :1]) or np.any(sums[:, 0] <= 0) or np.any(sums % k):
      raise StatsError(f"{where}: counts rows must sum to top_k * tokens, the same positive "
                       f"number of tokens at every layer of a domain; got row sums "
                       f"{sums.tolist()} with top_k={k}.")
    tokens = sums // k
    if np.any(self.counts > tokens[..., None]):
      raise StatsError(f"{where}: an expert is counted more often than there are tokens; the "
                       f"file is corrupt.")
    if self.counts_top1 is not None:
      t1 = self.counts_top1.sum(-1)
      if not np.array_equal(t1, tokens) or np.any(self.counts_top1 > self.counts):
        raise StatsError(f"{where}: counts_top1 must count every token once at every layer "
                         f"(tokens {tokens[:, 0].tolist()}) and never exceed counts; the file "
                         f"is corrupt.")

  def _check_cross(self, where: str) -> None:
    if (self.cross is None) != (len(self.cross_pairs) == 0):
      raise StatsError(f"{where}: cross and cross_pairs come together (both or neither).")
    for p, (a, b) in enumerate(self.cross_pairs):
      if a not in self.layers or b not in self.layers:
        raise StatsError(f"{where}: cross pair {(a, b)} uses a layer that was not recorded "
                         f"({list(self.layers)}).")
      ia, ib = self.layers.index(a), self.layers.index(b)
      for key, ref in (("cross", self.counts), ("cross_top1", self.counts_top1)):
        x = getattr(self, key)
        if x is None or ref is None:
          continue
        x = x[:, p]
        if (not np.array_equal(x.sum(-1), ref[:, ia]) or
            not np.array_equal(x.sum(-2), ref[:, ib])):
          raise StatsError(f"{where}: the marginals of {key} for layer pair {(a, b)} do not "
                           f"equal the per-layer counts; the file is corrupt.")

  # ---- I/O ---------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str | Path, name: str | None = None) -> "RoutingStats":
    """Read and validate a RoutingStats ``.npz``; ``name`` defaults to the file's stem without
    ``_domain_counts``."""
    path = Path(path)
    if not path.is_file():
      raise StatsError(f"no routing statistics file at {path}.")
    try:
      z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
      raise StatsError(f"{path} is not a readable .npz routing-statistics file ({err}).") from None
    with z:
      missing = [key for key in REQUIRED if key not in z.files]
      if missing:
        raise StatsError(f"routing stats {path} lacks arrays {missing}; the format is in "
                         f"docs/DESIGN.md (required: {', '.join(REQUIRED)}).")
      a = {key: np.asarray(z[key]) for key in REQUIRED + OPTIONAL if key in z.files}
    pairs = a.get("cross_pairs", np.zeros((0, 2), int))
    pairs = pairs.reshape(-1, 2) if pairs.size else np.zeros((0, 2), int)
    opt = {key: a[key].astype(np.int64) if key in a else None
           for key in ("counts_top1", "cross", "cross_top1")}
    return cls(name=name or path.stem.replace("_domain_counts", ""), path=str(path),
               domains=tuple(str(x) for x in a["domains"]),
               layers=tuple(int(x) for x in np.atleast_1d(a["layers"])),
               num_layers=int(a["num_layers"]), num_experts=int(a["num_experts"]),
               top_k=int(a["top_k"]), counts=a["counts"].astype(np.int64),
               cross_pairs=tuple((int(x), int(y)) for x, y in pairs), **opt)

  def save(self, path: str | Path) -> Path:
    """Write the ``.npz`` (optional arrays only when present)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(domains=np.array(self.domains), layers=np.array(self.layers),
                  num_layers=np.array(self.num_layers), num_experts=np.array(self.num_experts),
                  top_k=np.array(self.top_k), counts=self.counts)
    for key in ("counts_top1", "cross", "cross_top1"):
      if getattr(self, key) is not None:
        arrays[key] = getattr(self, key)
    if self.cross_pairs:
      arrays["cross_pairs"] = np.array(self.cross_pairs)
    np.savez_compressed(path, **arrays)
    return path
