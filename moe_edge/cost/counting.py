"""Exact counting of a trace's token-choices per (step, server, layer, expert), the inner loop
of :func:`moe_edge.cost.model.evaluate` (docs/DESIGN.md, "Cost"). Three exact paths, chosen per
chunk of steps by :func:`counting_path`; every expert time goes through
:meth:`moe_edge.core.hardware.Hardware.expert_time`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.core.hardware import Hardware

_CHUNK_CHOICES = 1 << 18   # token-choices per chunk of steps (keeps temporaries in cache)
_CHUNK_FLOWS = 1 << 22     # entries of the dense [S_c, L, N, N] flow counts per chunk


@dataclasses.dataclass(frozen=True)
class RouteMaps:
  """The route table ``[N, L, E]`` in the forms the counting paths need."""
  shape: tuple[int, int, int]
  dest: np.ndarray          # [N, L, E] int64 computing server m
  on_index: np.ndarray      # [N, L * E] int64 flat index (m * L + l) * E + e of the computation
  to32: np.ndarray          # [N, L, E, M] float32 one-hot of the destination
  bits: np.ndarray          # [N, L, M, W] uint64 bit e % 64 of word e // 64: experts sent to m

  @classmethod
  def build(cls, route: np.ndarray) -> "RouteMaps":
    n_srv, n_lay, n_exp = route.shape
    dest = route.astype(np.int64)
    le = np.arange(n_lay * n_exp, dtype=np.int64).reshape(n_lay, n_exp)
    on_index = (dest * n_lay * n_exp + le[None]).reshape(n_srv, -1)
    to = np.eye(n_srv, dtype=np.float32)[dest]
    e = np.arange(n_exp)
    words = -(-n_exp // 64)
    bit = np.left_shift(np.uint64(1), (e % 64).astype(np.uint64))                 # [E]
    in_word = (e // 64)[:, None] == np.arange(words)[None, :]                      # [E, W]
    sel = to.astype(bool)[..., None] & in_word[None, None, :, None, :]             # [N,L,E,M,W]
    bits = np.bitwise_or.reduce(np.where(sel, bit[:, None, None], np.uint64(0)), axis=2)
    return cls(route.shape, dest, on_index, to, bits)


_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))   # [64] single-bit words


def _popcount(x: np.ndarray) -> np.ndarray:
  """Set bits of each uint64 (uint8 result)."""
  if hasattr(np, "bitwise_count"):
    return np.bitwise_count(x)
  table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
  return table[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def chunks(step_tokens: np.ndarray, choices_per_token: int, flows_per_step: int):
  """``(s0, s1, t0, t1)`` ranges of consecutive steps (tokens sorted by step)."""
  bounds = np.concatenate([[0], np.cumsum(step_tokens)])
  s0, n_steps = 0, step_tokens.size
  while s0 < n_steps:
    s1 = s0 + 1
    while (s1 < n_steps and (bounds[s1 + 1] - bounds[s0]) * choices_per_token <= _CHUNK_CHOICES
           and (s1 + 1 - s0) * flows_per_step <= _CHUNK_FLOWS):
      s1 += 1
    yield s0, s1, int(bounds[s0]), int(bounds[s1])
    s0 = s1


# Each path counts one chunk of steps and returns (link-major layouts keep the reductions over
# servers, which are short, on the outer axes):
#   routed [N, M, S_c, L] float64: token-choices of n's tokens computed on m (m == n: local),
#   per    [M, S_c, L]    float64: expert compute seconds of server m at layer l.
def _chunk_dense(ids: np.ndarray, srv: np.ndarray, sloc: np.ndarray, n_steps: int,
                 maps: RouteMaps, hw: Hardware):
  """Few large steps: dense counts over (step, server, layer, expert).

  Counts go through float32 where that is exact (every count below 2**24: at most the step's
  tokens times k). When no step has enough tokens for an expert to become FLOP bound, only
  whether an expert is used matters and a boolean table replaces the counts.
  """
  n_srv, n_lay, n_exp = maps.shape
  le = n_lay * n_exp
  biggest = int(np.bincount(sloc).max())                  # tokens of the largest step
  exact32 = biggest * ids.shape[2] < 2**24
  row = (sloc * n_srv + srv)[:, None] * le + np.arange(0, le, n_exp)[None, :]   # [T_c, L]
  src = np.bincount((row[:, :, None] + ids).ravel(), minlength=n_steps * n_srv * le)
  src = np.ascontiguousarray(src.reshape(n_steps, n_srv * le).T,
                             dtype=np.float32 if exact32 else np.float64)
  srcn = src.reshape(n_srv, n_lay, n_exp, n_steps)        # [N, L, E, S_c]
  routed = np.empty((n_srv, n_srv, n_steps, n_lay))
  for n in range(n_srv):  # [L, S_c, E] @ [L, E, M] -> [L, S_c, M]
    routed[n] = np.matmul(srcn[n].transpose(0, 2, 1), maps.to32[n].astype(src.dtype)).transpose(
        2, 1, 0)
  read_bound = np.all(biggest * hw.expert_flop <= hw.expert_read)
  on = np.zeros(src.shape, dtype=bool if read_bound else src.dtype)
  for n in range(n_srv):  # (l, e) -> (m, l, e) is one-to-one for a fixed source n
    part = src[n * le:(n + 1) * le]
    if read_bound:
      on[maps.on_index[n]] |= part > 0
    else:
      on[maps.on_index[n]] += part
  on = on.reshape(n_srv, n_lay, n_exp, n_steps)
  if read_bound:  # every used expert costs its weight read
    per = on.sum(axis=2) * hw.expert_read[:, None, None]
  else:
    per = hw.expert_time(on, server_axis=0).sum(axis=2)
  return routed, per.transpose(0, 2, 1)


def _chunk_small(ids: np.ndarray, srv: np.ndarray, sloc: np.ndarray, n_steps: int,
                 maps: RouteMaps, hw: Hardware):
  """Many small steps in which every used expert is weight-read bound (``B[s] * F_e / peak[m]
  <= W_e / mbw[m]``, so an expert costs its weight read whatever its count): per
  (step, server, layer) only the *set* of experts matters, kept as 64-bit masks."""
  n_srv, n_lay, n_exp = maps.shape
  words = maps.bits.shape[-1]
  group = sloc * n_srv + srv
  order = np.argsort(group, kind="stable")             # tokens by (step, source server)
  group, ids, srv = group[order], ids[order], srv[order]
  if words == 1:                                        # [T_c, L, W] expert masks
    tok = np.take(_BIT, ids[:, :, 0])
    for r in range(1, ids.shape[2]):
      tok |= np.take(_BIT, ids[:, :, r])
    tok = tok[:, :, None]
  else:
    tok = np.zeros(ids.shape[:2] + (words,), dtype=np.uint64)
    for r in range(ids.shape[2]):
      bit, word = _BIT[ids[:, :, r] % 64], ids[:, :, r] // 64
      for w in range(words):
        tok[:, :, w] |= np.where(word == w, bit, np.uint64(0))
  # Token masks restricted to the experts each destination m computes: [L, M, W, T_c].
  hit = tok.transpose(1, 2, 0)[:, None] & np.take(maps.bits.transpose(1, 2, 3, 0), srv, axis=-1)
  starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
  count = _popcount(hit)
  count = count.sum(axis=2, dtype=np.int64) if words > 1 else count[:, :, 0]
  biggest = int(np.diff(np.append(starts, len(group))).max())
  acc = np.uint16 if biggest * ids.shape[2] < 2**16 else np.int64   # exact group sums
  if starts.size < group.size:                                      # some group has 2+ tokens
    count = np.add.reduceat(count, starts, axis=-1, dtype=acc)      # [L, M, G]
  if starts.size == n_steps * n_srv:               # every (step, server) has tokens: G = S_c N
    routed = np.ascontiguousarray(
        count.reshape(n_lay, n_srv, n_steps, n_srv).transpose(3, 1, 2, 0), dtype=np.float64)
  else:
    routed = np.zeros((n_srv, n_srv, n_steps, n_lay))
    routed[group[starts] % n_srv, :, group[starts] // n_srv, :] = count.transpose(2, 1, 0)
  step_starts = np.flatnonzero(np.concatenate([[True], sloc[order][1:] != sloc[order][:-1]]))
  used = _popcount(np.bitwise_or.reduceat(hit, step_starts, axis=-1)).sum(
      axis=2, dtype=np.int64)                                         # [L, M, S_c]
  return routed, (used * hw.expert_read[None, :, None]).transpose(1, 2, 0)


def _chunk_sparse(ids: np.ndarray, srv: np.ndarray, sloc: np.ndarray, n_steps: int,
                  maps: RouteMaps, hw: Hardware):
  """Many small steps in general: counts by sorting the (step, server, layer, expert) keys."""
  n_srv, n_lay, n_exp = maps.shape
  nle = n_srv * n_lay * n_exp
  row = (sloc * n_srv + srv)[:, None] * n_lay + np.arange(n_lay)[None, :]
  uk, inv = np.unique((row[:, :, None] * n_exp + ids).ravel(), return_inverse=True)
  cnt = np.bincount(inv.ravel(), minlength=uk.size).astype(np.float64)
  s = uk // nle
  n, l, e = np.unravel_index(uk % nle, maps.shape)
  m = maps.dest[n, l, e]
  routed = np.bincount(((n * n_srv + m) * n_steps + s) * n_lay + l, weights=cnt,
                       minlength=n_steps * n_lay * n_srv * n_srv)
  ok, oinv = np.unique(((s * n_srv + m) * n_lay + l) * n_exp + e, return_inverse=True)
  on = np.bincount(oinv.ravel(), weights=cnt, minlength=ok.size)
  om = (ok // (n_lay * n_exp)) % n_srv
  t_exp = hw.expert_time(on, servers=om)
  s, ml = ok // (n_srv * n_lay * n_exp), ok // n_exp % (n_srv * n_lay)  # ml = m * L + l
  per = np.bincount(((ml // n_lay) * n_steps + s) * n_lay + ml % n_lay, weights=t_exp,
                    minlength=n_steps * n_srv * n_lay)
  return routed.reshape(n_srv, n_srv, n_steps, n_lay), per.reshape(n_srv, n_steps, n_lay)


def counting_path(n_steps: int, choices: int, max_step_tokens: int, maps: RouteMaps,
                   hw: Hardware):
  """The cheapest exact counting path for a chunk."""
  n_srv, n_lay, n_exp = maps.shape
  if n_steps * n_srv * n_lay * n_exp <= 4 * choices + (1 << 16):
    return _chunk_dense
  if np.all(max_step_tokens * hw.expert_flop <= hw.expert_read):
    return _chunk_small
  return _chunk_sparse
