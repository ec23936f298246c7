r"""Map a trace of the small model (``E`` experts, top-``k``, ``L`` layers) to a larger shape
(``E'`` experts, top-``k'``, ``L'`` layers), deterministically.

Used to drive DeepSeek-V2-Lite (64 experts, top-6, 26 MoE layers) and Qwen1.5-MoE-A2.7B
(60 experts, top-4, 24 MoE layers) with the routing the trained small model (16 experts, top-2,
4 MoE layers) chose on real text, since no real routing of those models is available here.
The tables say so ("driven by small-model traces mapped to 64 experts").

**Experts -> groups.** Small expert ``e`` becomes a group of consecutive large experts,
``[start[e], start[e] + size[e])``; the sizes split ``E'`` as evenly as possible, the first
``E' mod E`` groups one larger (16 -> 64: groups of 4; 16 -> 60: twelve groups of 4, then four
of 3).

**Top-k -> top-k'.** A token's ``k`` small choices (best first) keep their order; rank ``r``
contributes ``c[r] = k' // k + (r < k' mod k)`` choices, all *distinct members* of its group
(groups are disjoint and the small choices are distinct, so the ``k'`` ids are distinct). Which
members: the ``c[r]`` members with the smallest keys ``splitmix64(seed, request, position,
l', r, member)`` -- a uniformly random ``c[r]``-subset of the group, fixed by the token's
identity (request, position) and the target layer, independent of the trace's row order. Each
member inherits ``gate / c[r]`` (the rank's gate split evenly; the token's gate sum is kept).

**Layers.** Target layer ``l'`` copies small layer ``l' mod L``. The first ``L`` target layers
keep the expert ids; later ones relabel all ``E'`` ids with a permutation seeded by
``(seed, l')`` (``np.random.default_rng([seed, l']).permutation(E')``), so layers that copy the
same small layer do not share hot expert ids (as in ``stats_traces.layer_plan``).

Consequences (tested): ids are distinct and in range; for every target layer and small expert
``e``, the choices that land in ``e``'s (relabelled) group number exactly
``sum_r c[r] * count(e chosen at rank r)`` -- with ``k | k'`` that is ``k'/k`` times the small
model's count, so every group-level statistic (per-server frequency, skew, locality) is the
small model's. Within a group the load is spread uniformly, so the mapped trace has *no* skew
inside groups that the real model might have: placement gains from intra-group skew are not
represented (a limitation the tables state).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from moe_edge.config import ModelConfig
from moe_edge.workload.traces import ActivationTrace, TraceError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class MappingError(TraceError):
  """A trace cannot be mapped to the requested shape."""


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
  x = np.asarray(x, dtype=np.uint64)
  with np.errstate(over="ignore"):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def hash_keys(seed: int, *parts) -> np.ndarray:
  """``splitmix64`` chained over ``seed`` and the (broadcast) integer arrays ``parts``."""
  h = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
  for p in parts:
    h = splitmix64(h ^ np.asarray(p).astype(np.int64).astype(np.uint64))
  return h


@dataclasses.dataclass(frozen=True)
class ExpertMapping:
  """How a small trace's ids become a large model's (module docstring).

  Attributes:
    source_shape: ``(L, E, k)`` of the small model.
    target_shape: ``(L', E', k')`` of the large model.
    group_start, group_size: ``[E]`` int64, small expert ``e`` -> large ids
      ``group_start[e] .. group_start[e] + group_size[e] - 1`` (before relabelling).
    picks: ``[k]`` int64, large choices each small rank contributes (sums to ``k'``).
    layer_source: ``[L']`` int64, the small layer each target layer copies.
    layer_perm: ``[L', E']`` int64, relabelling of target layer ``l'``: id ``i`` -> ``perm[i]``.
    seed: the mapping's seed.
  """
  source_shape: tuple[int, int, int]
  target_shape: tuple[int, int, int]
  group_start: np.ndarray
  group_size: np.ndarray
  picks: np.ndarray
  layer_source: np.ndarray
  layer_perm: np.ndarray
  seed: int

  def group_members(self, layer: int, expert: int) -> np.ndarray:
    """Large ids (after relabelling) of small ``expert``'s group at target ``layer``."""
    lo = int(self.group_start[expert])
    return self.layer_perm[layer, lo:lo + int(self.group_size[expert])]

  def describe(self) -> dict:
    (l, e, k), (l2, e2, k2) = self.source_shape, self.target_shape
    return dict(generator="moe_edge.experiments.trace_mapping.map_trace", seed=self.seed,
                source=dict(layers=l, experts=e, top_k=k),
                target=dict(layers=l2, experts=e2, top_k=k2),
                group_sizes=sorted(set(int(s) for s in self.group_size)),
                picks_per_rank=self.picks.tolist(),
                layers="target layer l copies small layer l mod L; layers >= L relabelled by "
                       "np.random.default_rng([seed, l]).permutation(E')")


def expert_mapping(source_shape: tuple[int, int, int], target_shape: tuple[int, int, int],
                   seed: int = 0) -> ExpertMapping:
  """The mapping from ``(L, E, k)`` to ``(L', E', k')`` (module docstring).

  Raises MappingError when the target has fewer experts or choices than the source, or when a
  rank would need more distinct members than its group has.
  """
  l, e, k = (int(x) for x in source_shape)
  l2, e2, k2 = (int(x) for x in target_shape)
  if min(l, e, k, l2, e2, k2) <= 0:
    raise MappingError(f"shapes must be positive, got {source_shape} -> {target_shape}.")
  if e2 < e or k2 < k:
    raise MappingError(f"cannot map {e} experts / top-{k} to {e2} experts / top-{k2}: the "
                       f"target needs at least as many experts and choices (each small expert "
                       f"becomes a group of large ones).")
  size = np.full(e, e2 // e, dtype=np.int64)
  size[: e2 % e] += 1
  start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
  picks = np.full(k, k2 // k, dtype=np.int64)
  picks[: k2 % k] += 1
  if picks.max() > size.min():
    raise MappingError(f"top-{k} -> top-{k2} needs {int(picks.max())} distinct members of one "
                       f"group but the smallest of the {e} groups of {e2} experts has "
                       f"{int(size.min())}; use a target with more experts per small expert.")
  perm = np.empty((l2, e2), dtype=np.int64)
  for layer in range(l2):
    perm[layer] = (np.arange(e2) if layer < l else
                   np.random.default_rng([seed, layer]).permutation(e2))
  return ExpertMapping((l, e, k), (l2, e2, k2), start, size, picks,
                       np.arange(l2, dtype=np.int64) % l, perm, int(seed))


def map_trace(trace: ActivationTrace, target: ModelConfig, seed: int = 0) -> ActivationTrace:
  """``trace`` (small model) at the shape of ``target`` (module docstring).

  Args:
    trace: ``expert_ids [T, L, k]`` of the small model.
    target: the large model (``L' = target.n_moe_layers``, ``E' = target.n_experts``,
      ``k' = target.top_k``).
    seed: the mapping's seed (member choice and layer relabelling).
  Returns:
    An ActivationTrace ``[T, L', k']`` with the same tokens (server, request, position, step),
    ``model = target.name`` and the mapping described in ``note``.
  """
  m = expert_mapping((trace.num_layers, trace.num_experts, trace.top_k),
                     (target.n_moe_layers, target.n_experts, target.top_k), seed)
  t = trace.num_tokens
  l2, e2, k2 = m.target_shape
  ids = np.empty((t, l2, k2), dtype=np.int32)
  gates = np.empty((t, l2, k2), dtype=np.float32)
  gmax = int(m.group_size.max())
  member = np.arange(gmax)[None, :]                                  # [1, G]
  request, position = trace.request[:, None], trace.position[:, None]
  col = 0
  for r, c in enumerate(m.picks):
    for layer in range(l2):
      small = trace.expert_ids[:, m.layer_source[layer], r].astype(np.int64)   # [T]
      keys = hash_keys(seed, request, position, layer, r, member)              # [T, G]
      keys = np.where(member < m.group_size[small][:, None], keys,
                      np.iinfo(np.uint64).max)                                  # pad members
      pick = np.argsort(keys, axis=1, kind="stable")[:, :c]                    # [T, c]
      ids[:, layer, col:col + c] = m.layer_perm[layer, m.group_start[small][:, None] + pick]
      gates[:, layer, col:col + c] = (trace.gate_weights[:, m.layer_source[layer], r] /
                                      c)[:, None]
    col += int(c)
  note = dict(m.describe(), source_model=trace.model, source_note=_short(trace.note))
  return ActivationTrace(
      expert_ids=ids, gate_weights=gates, server=trace.server, request=trace.request,
      position=trace.position, step=trace.step, model=target.name, num_experts=e2,
      num_servers=trace.num_servers,
      source=f"{trace.source} via {trace.model} routing mapped to {e2} experts",
      note=json.dumps(note))


def group_counts(trace: ActivationTrace, mapping: ExpertMapping) -> np.ndarray:
  """``[L', E]`` int64: choices of a mapped trace that land in each small expert's group."""
  l2, e2, _ = mapping.target_shape
  owner = np.repeat(np.arange(len(mapping.group_size)), mapping.group_size)  # [E'] pre-relabel
  out = np.zeros((l2, len(mapping.group_size)), dtype=np.int64)
  for layer in range(l2):
    inv = np.empty(e2, dtype=np.int64)
    inv[mapping.layer_perm[layer]] = np.arange(e2)
    out[layer] = np.bincount(owner[inv[trace.expert_ids[:, layer].ravel()]],
                             minlength=len(mapping.group_size))
  return out


def _short(note: str, limit: int = 400) -> str:
  """A trace note without its per-request lists (they can be long)."""
  try:
    d = json.loads(note)
  except (json.JSONDecodeError, TypeError):
    return note[:limit]
  if isinstance(d, dict):
    d = {k: v for k, v in d.items() if not isinstance(v, list) or len(v) <= 16}
  return json.dumps(d)[:limit]
