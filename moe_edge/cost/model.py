r"""The cost model: latency, bytes moved and local coverage of a placement on a trace.

Every number the tables report comes from here, and the real JAX dispatch is checked against it
(the bytes counted here equal the bytes the dispatch sends, exactly).

Notation: servers ``n, m`` in ``[0, N)``, MoE layers ``l`` in ``[0, L)``, experts ``e`` in
``[0, E)``, top-``k`` routing. From the cluster: ``bw[n, m]`` bytes/s (diagonal +inf),
``lat[n, m]`` seconds (diagonal 0), ``peak[m]`` FLOP/s, ``mbw[m]`` memory bytes/s; from the
calibration (default 1.0): ``eta_f[m]`` (FLOP efficiency) and ``eta_b[m]`` (bandwidth
efficiency). From the model: ``W_e = expert_bytes``, ``F_e = expert_flops_per_token``,
``W_d = dense_bytes`` (shared experts included), ``F_d = dense_flops_per_token`` and
``a = activation_bytes`` (bf16 hidden state; override e.g. with 4 for float32 execution).

**Steps.** A step is one synchronous pass of the model over every server's current batch:
decode -- one token per active request of the server (:func:`decode_batches` regroups a trace
that way); prefill -- all prompt tokens of a batch of requests (:func:`prefill_batches`). With a
trace, the steps are its distinct ``step`` values, costed independently; ``B[s, n]`` is the
number of tokens of server ``n`` at step ``s``.

**Routing.** Token ``t`` of server ``n`` choosing expert ``e = expert_ids[t, l, r]`` at layer
``l`` is computed on ``m = route[n, l, e]`` and is remote iff ``m != n``. Let
``C[s, l, n, m]`` count the remote token-choices of ``n``'s step-``s`` tokens sent to ``m``
(``C[s, l, n, n] = 0``). Dispatch sends the token's activations once per remote *choice* (no
de-duplication per destination) and the combine returns one vector per remote choice::

  dispatch bytes n -> m :  D[s, l, n, m] = a * C[s, l, n, m]
  combine  bytes m -> n :  D[s, l, n, m]            (the transposed volume)
  cross-server bytes    :  sum_{s, l, n, m} 2 * D[s, l, n, m]

**Expert compute** (roofline per expert actually used; ``c[s, m, l, e]`` = token-choices of
expert ``(l, e)`` computed on ``m`` at step ``s``)::

  P[s, m, l] = sum_{e : c > 0} max(W_e / (mbw[m] eta_b[m]), c[s, m, l, e] F_e / (peak[m] eta_f[m]))

**Exchange** (links work in parallel, a server's sends are serialised on its NIC)::

  dispatch[s, l] = max_n ( max_{m : D[s,l,n,m] > 0} lat[n, m] + sum_m D[s, l, n, m] / bw[n, m] )
  combine[s, l]  = max_m ( max_{n : D[s,l,n,m] > 0} lat[m, n] + sum_n D[s, l, n, m] / bw[m, n] )

(0 when nothing crosses.) A layer is synchronous -- a token waits for its slowest expert::

  layer[s, l] = dispatch[s, l] + max_m P[s, m, l] + combine[s, l]

**Dense part** (attention, router, norms, shared experts, embeddings; every server holds it and
runs it on its own tokens; servers without tokens at a step skip it)::

  dense[s] = max_{n : B[s,n] > 0} max( W_d / (mbw[n] eta_b[n]),  B[s, n] F_d / (peak[n] eta_f[n]) )

**Step latency** ``T[s] = dense[s] + sum_l layer[s, l]``. Decode latency per token = mean over
steps of ``T[s]``; prefill latency per request = mean over prompt batches of ``T[s]``.

**Coverage** = fraction of token-choices served locally (overall and per server).
**Memory** of server ``n`` = ``sum_{l,e} hosts[n, l, e] W_e + W_d``; it fits when at most
``memory_bytes - reserved_bytes``.

:func:`expected_cost` applies the same formulas to *expected* counts from a
:class:`~moe_edge.placement.problem.PlacementProblem` (for planning and migration), with
``x[n, l, e] = batch_tokens[n] * freq[n, l, e]`` token-choices per step:

* ``C``, ``c`` become their expectations (sums of ``x`` along the route table);
* an expert's weight read is charged with the probability that it is used at all, under a
  Poisson model: ``P(c > 0) = 1 - exp(-E[c])``, i.e.
  ``P[m, l] = sum_e max(W_e / (mbw eta_b) * (1 - exp(-E[c])), E[c] F_e / (peak eta_f))``;
* a link's latency is charged with the probability that the link carries anything,
  ``1 - exp(-E[C[l, n, m]])``.

Bytes, load and coverage are linear in the counts, so their expectations are exact. The times
take maxima of expectations where the expectation of a maximum is meant; as ``E[max] >= max E``
(Jensen), the expected step time is a lower bound of the mean step time under the Poisson model,
and it approaches :func:`evaluate` as batches grow and relative fluctuations shrink.

Implementation (vectorised numpy; steps are processed in chunks to bound memory), one of three
exact counting paths per chunk:

* few large steps: token-choices counted densely per (step, source server, layer, expert) with
  one ``bincount``, then pushed through the route table on the counted table (not per choice);
* many small steps where no expert can reach its FLOP-bound regime (``B[s] F_e / peak <= W_e /
  mbw``, every used expert costs its weight read): each token's experts as 64-bit masks, OR-ed
  per (step, computing server) and counted with ``popcount``;
* otherwise: the (step, server, layer, expert) keys are sorted (``np.unique``).

``benchmarks/bench_cost.py`` measures the throughput.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, model_config
from moe_edge.cost.calibrate import Calibration
from moe_edge.placement.problem import Placement, PlacementError, PlacementProblem
from moe_edge.workload.traces import ActivationTrace

PHASES = ("decode", "prefill")
_CHUNK_CHOICES = 1 << 18   # token-choices per chunk of steps (keeps temporaries in cache)
_CHUNK_FLOWS = 1 << 22     # entries of the dense [S_c, L, N, N] flow counts per chunk


class CostError(ValueError):
  """The cost model was given inputs that do not fit together."""


@dataclasses.dataclass(frozen=True)
class CostReport:
  """Costs of one placement on one workload. Times in seconds, bytes in bytes.

  Attributes:
    phase: ``"decode"`` or ``"prefill"``.
    expected: True for :func:`expected_cost` (expected counts; float bytes), False for a trace.
    num_steps: ``S``, steps costed.
    num_tokens: tokens costed (all servers, all steps).
    activation_bytes: bytes of one token's activations on the wire.
    step_latency: ``[S]`` seconds per step, ``dense_time + sum_l layer time``.
    dense_time: ``[S]`` seconds of the dense part of each step.
    dispatch_time, compute_time, combine_time: ``[L]`` mean over steps of each layer's
      dispatch, slowest-server expert compute and combine time.
    server_compute: ``[N, L]`` mean over steps of each server's expert compute per layer.
    load: ``[N, L]`` token-choices computed on each server per layer, over all steps.
    dispatch_bytes: ``[L, N, N]`` dispatch bytes ``n -> m`` per layer over all steps (int64 for
      a trace; the combine sends the transpose back).
    tokens_per_server: ``[N]`` tokens of each server's stream.
    local_choices, total_choices: ``[N]`` token-choices of each server's tokens served locally /
      in total.
    memory_used: ``[N]`` bytes held (hosted experts and dense weights).
    memory_capacity: ``[N]`` bytes available (``memory_bytes - reserved_bytes``).
    calibration_source: where the efficiency factors came from.
  """
  phase: str
  expected: bool
  num_steps: int
  num_tokens: float
  activation_bytes: int
  step_latency: np.ndarray
  dense_time: np.ndarray
  dispatch_time: np.ndarray
  compute_time: np.ndarray
  combine_time: np.ndarray
  server_compute: np.ndarray
  load: np.ndarray
  dispatch_bytes: np.ndarray
  tokens_per_server: np.ndarray
  local_choices: np.ndarray
  total_choices: np.ndarray
  memory_used: np.ndarray
  memory_capacity: np.ndarray
  calibration_source: str = "datasheet"

  # ---- latency -----------------------------------------------------------------------------
  @property
  def latency(self) -> float:
    """Mean step latency: per token in decode, per request batch in prefill."""
    return float(self.step_latency.mean())

  @property
  def layer_time(self) -> np.ndarray:
    """``[L]`` mean layer time, ``dispatch + compute + combine``."""
    return self.dispatch_time + self.compute_time + self.combine_time

  @property
  def exchange_time(self) -> float:
    """Mean seconds per step spent in dispatch and combine (all layers)."""
    return float(self.dispatch_time.sum() + self.combine_time.sum())

  # ---- bytes -------------------------------------------------------------------------------
  @property
  def bytes_matrix(self) -> np.ndarray:
    """``[N, N]`` bytes sent ``n -> m`` over all layers and steps, dispatch and combine."""
    d = self.dispatch_bytes.sum(axis=0)
    return d + d.T

  @property
  def cross_bytes(self) -> float:
    """Bytes that crossed servers (both directions, all layers, all steps)."""
    return float(2 * self.dispatch_bytes.sum())

  @property
  def cross_bytes_per_step(self) -> float:
    return self.cross_bytes / max(self.num_steps, 1)

  @property
  def cross_bytes_per_token(self) -> float:
    return self.cross_bytes / max(self.num_tokens, 1)

  # ---- coverage ----------------------------------------------------------------------------
  @property
  def coverage(self) -> float:
    """Fraction of all token-choices served on the token's own server."""
    return float(self.local_choices.sum() / max(self.total_choices.sum(), 1))

  @property
  def coverage_per_server(self) -> np.ndarray:
    """``[N]`` local fraction of each server's token-choices (NaN for a server without tokens)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.total_choices > 0, self.local_choices / self.total_choices, np.nan)

  # ---- memory ------------------------------------------------------------------------------
  @property
  def fits_per_server(self) -> np.ndarray:
    return self.memory_used <= self.memory_capacity

  @property
  def fits(self) -> bool:
    return bool(np.all(self.fits_per_server))

  def to_row(self) -> dict:
    """One flat row of the tables (times in ms, bytes in MB = 1e6 bytes)."""
    return dict(
        phase=self.phase, steps=self.num_steps, tokens=float(self.num_tokens),
        latency_ms=1e3 * self.latency, dense_ms=1e3 * float(self.dense_time.mean()),
        dispatch_ms=1e3 * float(self.dispatch_time.sum()),
        compute_ms=1e3 * float(self.compute_time.sum()),
        combine_ms=1e3 * float(self.combine_time.sum()), coverage=self.coverage,
        cross_mb_per_step=self.cross_bytes_per_step / 1e6,
        cross_kb_per_token=self.cross_bytes_per_token / 1e3,
        max_memory_frac=float(np.max(self.memory_used / self.memory_capacity)),
        fits=self.fits, calibration=self.calibration_source)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Hardware:
  """Per-server roofline coefficients (seconds) and links."""
  expert_read: np.ndarray   # [N] W_e / (mbw eta_b)
  expert_flop: np.ndarray   # [N] F_e / (peak eta_f), seconds per token
  dense_read: np.ndarray    # [N]
  dense_flop: np.ndarray    # [N]
  inv_bw: np.ndarray        # [N, N] 1 / bw, diagonal 0
  lat: np.ndarray           # [N, N] diagonal 0
  source: str


def _hardware(model: ModelConfig, cluster: ClusterConfig,
              calibration: Calibration | None) -> _Hardware:
  cal = calibration if calibration is not None else Calibration.datasheet(cluster)
  cal.check(cluster)
  flops = cluster.peak_flops * cal.flops_efficiency
  mbw = cluster.mem_bandwidth * cal.bw_efficiency
  inv_bw = 1.0 / cluster.bandwidth_matrix
  np.fill_diagonal(inv_bw, 0.0)
  return _Hardware(model.expert_bytes / mbw, model.expert_flops_per_token / flops,
                   model.dense_bytes / mbw, model.dense_flops_per_token / flops, inv_bw,
                   cluster.latency_matrix, cal.source)


def _check_phase(phase: str) -> None:
  if phase not in PHASES:
    raise CostError(f"phase must be one of {PHASES}, got {phase!r}.")


def _activation_bytes(model: ModelConfig, activation_bytes: int | None) -> int:
  if activation_bytes is None:
    return int(model.activation_bytes)
  if int(activation_bytes) != activation_bytes or activation_bytes <= 0:
    raise CostError(f"activation_bytes must be a positive integer (bytes of one token's hidden "
                    f"state on the wire), got {activation_bytes!r}.")
  return int(activation_bytes)


def _check_placement(placement: Placement, shape: tuple[int, int, int], what: str) -> None:
  if not isinstance(placement, Placement):
    raise CostError(f"expected a Placement, got {type(placement).__name__}.")
  if placement.hosts.shape != shape:
    raise CostError(f"placement is [N, L, E] = {list(placement.hosts.shape)} but {what} needs "
                    f"{list(shape)}; place experts for this model and cluster.")
  try:
    placement.validate()
  except PlacementError as e:
    raise CostError(f"invalid placement: {e}") from None


def _memory(model: ModelConfig, cluster: ClusterConfig,
            placement: Placement) -> tuple[np.ndarray, np.ndarray]:
  used = placement.experts_per_server.astype(np.float64) * model.expert_bytes + model.dense_bytes
  cap = np.array([s.memory_bytes - s.reserved_bytes for s in cluster.servers], dtype=np.float64)
  return used, cap


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _RouteMaps:
  """The route table ``[N, L, E]`` in the forms the counting paths need."""
  shape: tuple[int, int, int]
  dest: np.ndarray          # [N, L, E] int64 computing server m
  on_index: np.ndarray      # [N, L * E] int64 flat index (m * L + l) * E + e of the computation
  to32: np.ndarray          # [N, L, E, M] float32 one-hot of the destination
  bits: np.ndarray          # [N, L, M, W] uint64 bit e % 64 of word e // 64: experts sent to m

  @classmethod
  def build(cls, route: np.ndarray) -> "_RouteMaps":
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


def _chunks(step_tokens: np.ndarray, choices_per_token: int, flows_per_step: int):
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
                 maps: _RouteMaps, hw: _Hardware):
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
  if read_bound:
    per = on.sum(axis=2) * hw.expert_read[:, None, None]
  else:
    read = hw.expert_read[:, None, None, None]
    flop = hw.expert_flop[:, None, None, None]
    per = np.maximum((on > 0) * read, on * flop).sum(axis=2)   # max(.,.) is 0 where unused
  return routed, per.transpose(0, 2, 1)


def _chunk_small(ids: np.ndarray, srv: np.ndarray, sloc: np.ndarray, n_steps: int,
                 maps: _RouteMaps, hw: _Hardware):
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
                  maps: _RouteMaps, hw: _Hardware):
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
  t_exp = np.maximum(hw.expert_read[om], on * hw.expert_flop[om])
  s, ml = ok // (n_srv * n_lay * n_exp), ok // n_exp % (n_srv * n_lay)  # ml = m * L + l
  per = np.bincount(((ml // n_lay) * n_steps + s) * n_lay + ml % n_lay, weights=t_exp,
                    minlength=n_steps * n_srv * n_lay)
  return routed.reshape(n_srv, n_srv, n_steps, n_lay), per.reshape(n_srv, n_steps, n_lay)


def _counting_path(n_steps: int, choices: int, max_step_tokens: int, maps: _RouteMaps,
                   hw: _Hardware):
  """The cheapest exact counting path for a chunk."""
  n_srv, n_lay, n_exp = maps.shape
  if n_steps * n_srv * n_lay * n_exp <= 4 * choices + (1 << 16):
    return _chunk_dense
  if np.all(max_step_tokens * hw.expert_flop <= hw.expert_read):
    return _chunk_small
  return _chunk_sparse


def _exchange_times(vol: np.ndarray, hw: _Hardware,
                    link_used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dispatch and combine seconds ``[X]`` of ``X`` exchanges.

  Args:
    vol: ``[N, M, X]`` dispatch bytes ``n -> m`` (diagonal zero); the combine sends them back.
    link_used: ``[N, M, X]`` weight (0..1) of each link's latency.
  """
  send = np.einsum("nmx,nm->nx", vol, hw.inv_bw)
  wait = (link_used * hw.lat[:, :, None]).max(axis=1)
  back = np.einsum("nmx,mn->mx", vol, hw.inv_bw)
  wait_back = (link_used * hw.lat.T[:, :, None]).max(axis=0)
  return (send + wait).max(axis=0), (back + wait_back).max(axis=0)


def _count_exchange_times(routed: np.ndarray, act: int,
                          hw: _Hardware) -> tuple[np.ndarray, np.ndarray]:
  """:func:`_exchange_times` of counted token-choices ``routed [N, M, X]`` (diagonal: local
  choices, which move nothing: ``inv_bw`` and ``lat`` are zero there)."""
  used = routed > 0
  send = np.einsum("nmx,nm->nx", routed, act * hw.inv_bw)
  send += (used * hw.lat[:, :, None]).max(axis=1)
  back = np.einsum("nmx,mn->mx", routed, act * hw.inv_bw)
  back += (used * hw.lat.T[:, :, None]).max(axis=0)
  return send.max(axis=0), back.max(axis=0)


def _dense_times(tokens: np.ndarray, hw: _Hardware) -> np.ndarray:
  """``[S]`` dense seconds from ``tokens [S, N]``."""
  t = np.maximum(hw.dense_read[None, :], tokens * hw.dense_flop[None, :])
  return np.max(np.where(tokens > 0, t, 0.0), axis=-1)


def _step_order(trace: ActivationTrace) -> tuple[np.ndarray, np.ndarray | None]:
  """``(step index [T] in 0..S-1, token order sorting by step or None if already sorted)``."""
  _, sidx = np.unique(trace.step, return_inverse=True)
  sidx = sidx.ravel().astype(np.int64)
  if sidx.size < 2 or np.all(sidx[1:] >= sidx[:-1]):
    return sidx, None
  order = np.argsort(sidx, kind="stable")
  return sidx[order], order


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def evaluate(trace: ActivationTrace, model: ModelConfig | str, cluster: ClusterConfig,
             placement: Placement, phase: str = "decode",
             calibration: Calibration | None = None,
             activation_bytes: int | None = None) -> CostReport:
  """Cost ``placement`` on every step of ``trace`` (formulas in the module docstring).

  Args:
    trace: tokens ``T`` with ``expert_ids [T, L, k]``, ``server [T]`` and ``step [T]``.
    model: model config (or preset name) the trace was recorded with.
    cluster: the ``N`` servers and their links.
    placement: ``hosts``/``route`` ``[N, L, E]``.
    phase: ``"decode"`` or ``"prefill"`` (labels what a step is; see :func:`prefill_batches`).
    calibration: per-server efficiency factors (default: the datasheet, factors 1.0).
    activation_bytes: bytes per token-choice on the wire (default ``model.activation_bytes``).
  Returns:
    A :class:`CostReport`.
  Raises:
    CostError (or the trace's TraceError) when the inputs do not fit together.
  """
  model = model_config(model)
  _check_phase(phase)
  n_srv, n_lay, n_exp = cluster.num_servers, model.n_moe_layers, model.n_experts
  trace.check_matches(n_lay, n_exp, model.top_k, n_srv)
  _check_placement(placement, (n_srv, n_lay, n_exp),
                   f"model {model.name!r} on cluster {cluster.name!r}")
  if trace.num_tokens == 0:
    raise CostError("the trace has no tokens; nothing to cost.")
  act = _activation_bytes(model, activation_bytes)
  hw = _hardware(model, cluster, calibration)
  maps = _RouteMaps.build(placement.route)
  k = model.top_k

  sidx, order = _step_order(trace)
  ids = trace.expert_ids if order is None else trace.expert_ids[order]
  srv = (trace.server if order is None else trace.server[order]).astype(np.int64)
  n_steps = int(sidx[-1]) + 1
  tokens = np.bincount(sidx * n_srv + srv, minlength=n_steps * n_srv).reshape(n_steps, n_srv)

  dispatch = np.zeros((n_steps, n_lay))
  combine = np.zeros((n_steps, n_lay))
  compute = np.zeros((n_steps, n_lay))
  server_compute = np.zeros((n_srv, n_lay))
  routed_total = np.zeros((n_srv, n_srv, n_lay))
  step_tokens = tokens.sum(axis=1)
  for s0, s1, t0, t1 in _chunks(step_tokens, n_lay * k, n_lay * n_srv * n_srv):
    path = _counting_path(s1 - s0, (t1 - t0) * n_lay * k, int(step_tokens[s0:s1].max()), maps,
                          hw)
    routed, per = path(ids[t0:t1], srv[t0:t1], sidx[t0:t1] - s0, s1 - s0, maps, hw)
    routed_total += routed.sum(axis=2)
    disp, comb = _count_exchange_times(routed.reshape(n_srv, n_srv, -1), act, hw)
    dispatch[s0:s1], combine[s0:s1] = disp.reshape(-1, n_lay), comb.reshape(-1, n_lay)
    compute[s0:s1] = per.max(axis=0)
    server_compute += per.sum(axis=1)

  routed_total = np.rint(routed_total).astype(np.int64).transpose(2, 0, 1)  # [L, N, M]
  local = np.einsum("lnn->n", routed_total)
  load = routed_total.sum(axis=1).T                                          # [M, L]
  dispatch_bytes = routed_total * (1 - np.eye(n_srv, dtype=np.int64)) * act
  used, cap = _memory(model, cluster, placement)
  dense_t = _dense_times(tokens, hw)
  return CostReport(
      phase=phase, expected=False, num_steps=n_steps, num_tokens=float(trace.num_tokens),
      activation_bytes=act, step_latency=dense_t + (dispatch + compute + combine).sum(axis=1),
      dense_time=dense_t, dispatch_time=dispatch.mean(axis=0),
      compute_time=compute.mean(axis=0), combine_time=combine.mean(axis=0),
      server_compute=server_compute / n_steps, load=load, dispatch_bytes=dispatch_bytes,
      tokens_per_server=trace.tokens_per_server().astype(np.float64),
      local_choices=local.astype(np.float64),
      total_choices=routed_total.sum(axis=(0, 2)).astype(np.float64), memory_used=used,
      memory_capacity=cap, calibration_source=hw.source)


def expected_cost(problem: PlacementProblem, placement: Placement,
                  batch_tokens: Sequence[float] | np.ndarray, phase: str = "decode",
                  calibration: Calibration | None = None,
                  activation_bytes: int | None = None) -> CostReport:
  """Cost of one step with ``batch_tokens [N]`` tokens per server, on expected counts.

  ``x[n, l, e] = batch_tokens[n] * problem.freq[n, l, e]`` token-choices; the formulas of
  :func:`evaluate` are applied to their expectations along the route table, with expert weight
  reads and link latencies charged by the Poisson probability ``1 - exp(-expected count)`` that
  they occur (module docstring). Byte counts in the report are float expectations.
  """
  _check_phase(phase)
  model, cluster = problem.model, problem.cluster
  n_srv, n_lay, n_exp = problem.shape
  _check_placement(placement, problem.shape, "the problem")
  b = np.asarray(batch_tokens, dtype=np.float64)
  if b.shape != (n_srv,) or not np.all(np.isfinite(b)) or np.any(b < 0):
    raise CostError(f"batch_tokens must be [N] = [{n_srv}] finite non-negative tokens per step, "
                    f"got {np.shape(batch_tokens)}.")
  act = _activation_bytes(model, activation_bytes)
  hw = _hardware(model, cluster, calibration)

  x = b[:, None, None] * problem.freq                                  # [N, L, E]
  to = np.eye(n_srv, dtype=np.float64)[placement.route]                # [N, L, E, M] one-hot
  on = np.einsum("nle,nlem->mle", x, to)                               # E[c] [M, L, E]
  flows = np.einsum("nle,nlem->lnm", x, to) * (1.0 - np.eye(n_srv))   # E[C] [L, N, M]
  t_exp = np.maximum(hw.expert_read[:, None, None] * -np.expm1(-on),
                     on * hw.expert_flop[:, None, None])
  per = t_exp.sum(axis=2)                                              # [M, L]
  flows_nm = flows.transpose(1, 2, 0)                                  # [N, M, L]
  dispatch, combine = _exchange_times(act * flows_nm, hw, -np.expm1(-flows_nm))
  dense = _dense_times(b[None, :], hw)
  step = dense + (dispatch + per.max(axis=0) + combine).sum()
  total = b * problem.freq.sum(axis=(1, 2))
  local = np.einsum("nle,nlen->n", x, to)
  used, cap = _memory(model, cluster, placement)
  return CostReport(
      phase=phase, expected=True, num_steps=1, num_tokens=float(b.sum()), activation_bytes=act,
      step_latency=step.reshape(1), dense_time=dense.reshape(1), dispatch_time=dispatch,
      compute_time=per.max(axis=0), combine_time=combine, server_compute=per,
      load=on.sum(axis=2), dispatch_bytes=act * flows, tokens_per_server=b,
      local_choices=local, total_choices=total, memory_used=used, memory_capacity=cap,
      calibration_source=hw.source)


def bytes_matrix(trace: ActivationTrace, placement: Placement,
                 activation_bytes: int) -> np.ndarray:
  """``[L, N, N]`` int64: dispatch bytes ``n -> m`` per layer over the whole trace.

  ``activation_bytes`` times the number of token-choices of server ``n``'s tokens that the route
  table sends to ``m != n`` (diagonal zero). The combine sends the transpose back, so the bytes
  crossing servers at layer ``l`` are ``2 * out[l].sum()``. Exact integers; the real dispatch
  must move exactly this.
  """
  if int(activation_bytes) != activation_bytes or activation_bytes <= 0:
    raise CostError(f"activation_bytes must be a positive integer, got {activation_bytes!r}.")
  n_srv, n_lay, n_exp = placement.route.shape
  trace.check_matches(n_lay, n_exp, num_servers=n_srv, what="placement")
  counts = trace.counts()                                                  # [N, L, E]
  to = np.eye(n_srv, dtype=np.int64)[placement.route]                      # [N, L, E, M]
  to[np.arange(n_srv), :, :, np.arange(n_srv)] = 0                         # local: no bytes
  return np.einsum("nle,nlem->lnm", counts, to) * int(activation_bytes)


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
