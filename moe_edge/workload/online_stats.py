"""Online expert-activation statistics: a sliding window and an EMA per server, layer and expert.

A serving system does not know the workload's activation frequencies ahead of time, and they
drift (a server's users move from code to prose). :class:`OnlineStats` keeps, for every server
``n``, MoE layer ``l`` and expert ``e``:

* a **sliding window** over the last ``W`` steps: a ring buffer of per-step token-choice counts
  ``[W, N, L, E]`` and per-step token counts ``[W, N]``; the window frequency is
  ``sum_w counts / sum_w tokens``;
* an **exponential moving average** with decay ``d`` of the counts and of the tokens; the EMA
  frequency is their ratio. Both numerator and denominator start at zero and decay alike, so the
  ratio needs no start-up bias correction, and a step in which a server saw no tokens leaves its
  frequency unchanged (it is an EMA of frequencies weighted by the tokens behind them).

Frequencies are token-choices per token, like :meth:`ActivationTrace.frequency`: each
``[n, l, :]`` row sums to ``top_k`` (or is all zero for a server that has seen no tokens).

Two implementations of the same update:

* :meth:`OnlineStats.update` takes counts ``[N, L, E]`` and tokens ``[N]`` (numpy, O(N L E)).
* :func:`update_jax` is a pure, jittable function on an :class:`OnlineStatsState` pytree that
  takes the routing decisions of a batch, ``expert_ids [T, L, k]`` and ``server [T]``, and counts
  them with one scatter-add, so it can run inside the dispatch step at negligible cost.
  :meth:`OnlineStats.to_state` / :meth:`OnlineStats.from_state` convert between the two.

Drift is measured as the total-variation distance between the current frequency and the one the
current placement was planned for (:meth:`OnlineStats.mark_planned`), per server and layer.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_edge.core.errors import MoeEdgeError
from moe_edge.workload.traces import ActivationTrace, TraceError

KINDS = ("ema", "window")


class StatsError(MoeEdgeError):
  """Bad arguments to the online statistics (shapes, window, decay, kind)."""


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise StatsError(f"frequency kind must be one of {KINDS}, got {kind!r}.")


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """``num [N, L, E] / den [N]`` with zero where ``den == 0``."""
  den = np.asarray(den, dtype=np.float64)[:, None, None]
  return np.divide(num, den, out=np.zeros(np.shape(num), dtype=np.float64), where=den > 0)


def tv_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """Total-variation distance between two frequency tensors, per server and layer.

  Args:
    p, q: ``[N, L, E]`` non-negative frequencies (any row scale; each row is normalised to a
      distribution over experts first).
  Returns:
    ``[N, L]`` float64 in [0, 1]; 0 where either row is all zero (nothing observed, no evidence
    of drift).
  """
  p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
  if p.shape != q.shape or p.ndim != 3:
    raise StatsError(f"tv_distance needs two [N, L, E] arrays of one shape, got {p.shape} and "
                     f"{q.shape}.")
  ps, qs = p.sum(axis=2, keepdims=True), q.sum(axis=2, keepdims=True)
  ok = (ps[..., 0] > 0) & (qs[..., 0] > 0)
  pn = np.divide(p, ps, out=np.zeros_like(p), where=ps > 0)
  qn = np.divide(q, qs, out=np.zeros_like(q), where=qs > 0)
  return np.where(ok, 0.5 * np.abs(pn - qn).sum(axis=2), 0.0)


# --------------------------------------------------------------------------------------------
# Pure JAX state and update
# --------------------------------------------------------------------------------------------
class OnlineStatsState(NamedTuple):
  """Pytree state of the online statistics.

  Attributes:
    ring_counts: ``[W, N, L, E]`` float32, token-choices of the last ``W`` steps.
    ring_tokens: ``[W, N]`` float32, tokens of the last ``W`` steps.
    pos: ``[]`` int32, ring slot the next step writes.
    steps: ``[]`` int32, steps seen so far.
    ema_counts: ``[N, L, E]`` float32, EMA of per-step token-choices.
    ema_tokens: ``[N]`` float32, EMA of per-step tokens.
    decay: ``[]`` float32, EMA decay ``d`` (weight of the past).
  """
  ring_counts: jax.Array
  ring_tokens: jax.Array
  pos: jax.Array
  steps: jax.Array
  ema_counts: jax.Array
  ema_tokens: jax.Array
  decay: jax.Array


def init_state(num_servers: int, num_layers: int, num_experts: int, window: int,
               decay: float) -> OnlineStatsState:
  """Empty :class:`OnlineStatsState` (see :class:`OnlineStats` for the arguments)."""
  _check_sizes(num_servers, num_layers, num_experts, window, decay)
  n, l, e, w = num_servers, num_layers, num_experts, window
  return OnlineStatsState(
      ring_counts=jnp.zeros((w, n, l, e), jnp.float32), ring_tokens=jnp.zeros((w, n), jnp.float32),
      pos=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
      ema_counts=jnp.zeros((n, l, e), jnp.float32), ema_tokens=jnp.zeros((n,), jnp.float32),
      decay=jnp.asarray(decay, jnp.float32))


def count_choices_jax(expert_ids: jax.Array, server: jax.Array, num_servers: int,
                      num_experts: int, valid: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Token-choice counts of one batch with one scatter-add (jittable).

  Args:
    expert_ids: ``[T, L, k]`` int, expert picked by token t at layer l, rank r.
    server: ``[T]`` int, the server whose stream token t belongs to.
    num_servers, num_experts: ``N`` and ``E`` (static).
    valid: optional ``[T]`` bool; padding tokens (False) are not counted.
  Returns:
    ``counts [N, L, E]`` float32 and ``tokens [N]`` float32.
  """
  t, l, k = expert_ids.shape
  w = jnp.ones((t,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  flat = (server[:, None, None] * l + jnp.arange(l)[None, :, None]) * num_experts + expert_ids
  weights = jnp.broadcast_to(w[:, None, None], flat.shape)
  counts = jnp.zeros((num_servers * l * num_experts,), jnp.float32).at[flat.reshape(-1)].add(
      weights.reshape(-1))
  tokens = jnp.zeros((num_servers,), jnp.float32).at[server].add(w)
  return counts.reshape(num_servers, l, num_experts), tokens


def update_counts_jax(state: OnlineStatsState, counts: jax.Array,
                      tokens: jax.Array) -> OnlineStatsState:
  """One step from counts ``[N, L, E]`` and tokens ``[N]``; the math of
  :meth:`OnlineStats.update`."""
  d = state.decay
  return OnlineStatsState(
      ring_counts=state.ring_counts.at[state.pos].set(counts),
      ring_tokens=state.ring_tokens.at[state.pos].set(tokens),
      pos=(state.pos + 1) % state.ring_counts.shape[0],
      steps=state.steps + 1,
      ema_counts=d * state.ema_counts + (1.0 - d) * counts,
      ema_tokens=d * state.ema_tokens + (1.0 - d) * tokens,
      decay=d)


@jax.jit
def update_jax(state: OnlineStatsState, expert_ids: jax.Array, server: jax.Array,
               valid: jax.Array | None = None) -> OnlineStatsState:
  """One step from a batch's routing decisions; pure and jitted.

  Args:
    state: the current :class:`OnlineStatsState`.
    expert_ids: ``[T, L, k]`` int, the batch's top-k choices per MoE layer.
    server: ``[T]`` int, each token's server.
    valid: optional ``[T]`` bool mask of real (non-padding) tokens.
  Returns:
    the new state; equal (to float32 rounding) to :meth:`OnlineStats.update` with the batch's
    counts.
  """
  n, l, e = state.ema_counts.shape
  if expert_ids.ndim != 3 or expert_ids.shape[1] != l:
    raise StatsError(f"expert_ids must be [T, L={l}, k], got shape {expert_ids.shape}.")
  if server.shape != expert_ids.shape[:1]:
    raise StatsError(f"server must be [T] = [{expert_ids.shape[0]}], got {server.shape}.")
  counts, tokens = count_choices_jax(expert_ids, server, n, e, valid)
  return update_counts_jax(state, counts, tokens)


# --------------------------------------------------------------------------------------------
# NumPy tracker
# --------------------------------------------------------------------------------------------
def _check_sizes(n: int, l: int, e: int, window: int, decay: float) -> None:
  if min(n, l, e) <= 0:
    raise StatsError(f"num_servers, num_layers and num_experts must be positive, got "
                     f"{(n, l, e)}.")
  if int(window) != window or window <= 0:
    raise StatsError(f"window must be a positive number of steps, got {window}.")
  if not 0.0 <= decay < 1.0:
    raise StatsError(f"EMA decay must lie in [0, 1) (weight of the past per step), got {decay}; "
                     f"a half-life of h steps is decay = 0.5 ** (1 / h).")


class OnlineStats:
  """Sliding-window and EMA activation statistics of a running cluster (numpy).

  Args:
    num_servers, num_layers, num_experts: ``N``, ``L``, ``E``.
    window: ``W``, steps the sliding window covers.
    decay: EMA weight of the past per step, in [0, 1) (``0.5 ** (1 / half_life_steps)``).
  """

  def __init__(self, num_servers: int, num_layers: int, num_experts: int, window: int,
               decay: float = 0.9):
    _check_sizes(num_servers, num_layers, num_experts, window, decay)
    self.shape = (int(num_servers), int(num_layers), int(num_experts))
    self.window = int(window)
    self.decay = float(decay)
    n, l, e = self.shape
    self.ring_counts = np.zeros((self.window, n, l, e), np.float64)
    self.ring_tokens = np.zeros((self.window, n), np.float64)
    self.pos = 0
    self.steps = 0
    self.ema_counts = np.zeros((n, l, e), np.float64)
    self.ema_tokens = np.zeros((n,), np.float64)
    self.planned_freq: np.ndarray | None = None

  # ---- updates -----------------------------------------------------------------------------
  def update(self, counts: np.ndarray, tokens: np.ndarray) -> None:
    """Add one step.

    Args:
      counts: ``[N, L, E]`` token-choices of the step per server, layer and expert.
      tokens: ``[N]`` tokens of the step per server.
    """
    counts = np.asarray(counts, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if counts.shape != self.shape:
      raise StatsError(f"counts must be [N, L, E] = {list(self.shape)}, got {counts.shape}.")
    if tokens.shape != self.shape[:1]:
      raise StatsError(f"tokens must be [N] = [{self.shape[0]}], got {tokens.shape}.")
    if np.any(counts < 0) or np.any(tokens < 0):
      raise StatsError("counts and tokens must be non-negative.")
    self.ring_counts[self.pos] = counts
    self.ring_tokens[self.pos] = tokens
    self.pos = (self.pos + 1) % self.window
    self.steps += 1
    d = self.decay
    self.ema_counts = d * self.ema_counts + (1.0 - d) * counts
    self.ema_tokens = d * self.ema_tokens + (1.0 - d) * tokens

  def update_trace(self, trace: ActivationTrace) -> None:
    """Add the tokens of ``trace`` as one step (typically ``trace.window(s, s + 1)``)."""
    n, l, e = self.shape
    trace.check_matches(l, e, num_servers=n, what="online statistics")
    self.update(trace.counts(), trace.tokens_per_server())

  def update_steps(self, trace: ActivationTrace) -> None:
    """Add every step of ``trace`` in time order, one :meth:`update` per distinct step value."""
    n, l, e = self.shape
    trace.check_matches(l, e, num_servers=n, what="online statistics")
    if trace.num_tokens == 0:
      raise TraceError("update_steps got an empty trace; nothing to add.")
    for s in np.unique(trace.step):
      self.update_trace(trace.select(trace.step == s))

  # ---- queries -----------------------------------------------------------------------------
  def frequency(self, kind: str = "ema") -> np.ndarray:
    """``[N, L, E]`` float64 token-choices per token ("ema" or "window"); zero rows for servers
    that have seen no tokens."""
    _check_kind(kind)
    if kind == "ema":
      return _safe_ratio(self.ema_counts, self.ema_tokens)
    return _safe_ratio(self.ring_counts.sum(axis=0), self.ring_tokens.sum(axis=0))

  def window_halves(self) -> tuple[np.ndarray, np.ndarray]:
    """Window frequencies ``[N, L, E]`` of two disjoint, interleaved halves of the window's steps
    (ring slots of even and of odd index). A plan fitted on one half and scored on the other
    gives a gain estimate free of the optimism of scoring a plan on its own sample
    (:func:`moe_edge.placement.migration.cross_validated_saving`)."""
    if min(self.steps, self.window) < 2:
      raise StatsError("window_halves needs at least two steps in the window.")
    even, odd = self.ring_counts[0::2].sum(axis=0), self.ring_counts[1::2].sum(axis=0)
    return (_safe_ratio(even, self.ring_tokens[0::2].sum(axis=0)),
            _safe_ratio(odd, self.ring_tokens[1::2].sum(axis=0)))

  def tokens(self, kind: str = "ema") -> np.ndarray:
    """``[N]`` float64 tokens per step of each server (EMA, or mean over the filled window)."""
    _check_kind(kind)
    if kind == "ema":
      # Undo the zero-start bias of the token EMA so this is a rate, not a shrunk rate.
      return self.ema_tokens / max(1.0 - self.decay ** self.steps, 1e-300)
    filled = min(self.steps, self.window)
    return self.ring_tokens.sum(axis=0) / max(filled, 1)

  def mark_planned(self, freq: np.ndarray | None = None, kind: str = "window") -> None:
    """Record the frequency the current placement was planned for (default: the current one)."""
    f = self.frequency(kind) if freq is None else np.asarray(freq, dtype=np.float64)
    if f.shape != self.shape:
      raise StatsError(f"planned frequency must be [N, L, E] = {list(self.shape)}, got "
                       f"{f.shape}.")
    self.planned_freq = f.copy()

  def drift(self, kind: str = "window") -> np.ndarray:
    """``[N, L]`` TV distance between the current frequency and the planned one."""
    if self.planned_freq is None:
      raise StatsError("no planned frequency yet; call mark_planned() when a placement is "
                       "made or applied.")
    return tv_distance(self.frequency(kind), self.planned_freq)

  # ---- JAX interop -------------------------------------------------------------------------
  def to_state(self) -> OnlineStatsState:
    """This tracker as an :class:`OnlineStatsState` (float32) for :func:`update_jax`."""
    return OnlineStatsState(
        ring_counts=jnp.asarray(self.ring_counts, jnp.float32),
        ring_tokens=jnp.asarray(self.ring_tokens, jnp.float32),
        pos=jnp.asarray(self.pos, jnp.int32), steps=jnp.asarray(self.steps, jnp.int32),
        ema_counts=jnp.asarray(self.ema_counts, jnp.float32),
        ema_tokens=jnp.asarray(self.ema_tokens, jnp.float32),
        decay=jnp.asarray(self.decay, jnp.float32))

  @classmethod
  def from_state(cls, state: OnlineStatsState) -> "OnlineStats":
    """A numpy tracker holding ``state`` (the planned frequency is not part of the state)."""
    w, n, l, e = state.ring_counts.shape
    out = cls(n, l, e, w, float(state.decay))
    out.ring_counts = np.asarray(state.ring_counts, np.float64)
    out.ring_tokens = np.asarray(state.ring_tokens, np.float64)
    out.pos, out.steps = int(state.pos), int(state.steps)
    out.ema_counts = np.asarray(state.ema_counts, np.float64)
    out.ema_tokens = np.asarray(state.ema_tokens, np.float64)
    return out
