r"""Expected request latency of a workload on the cost model: what a user of a server waits for.

The cost model prices one step (``CostModel.expected``: a decode step with ``decode_batch[n]``
tokens per server, a prefill step with ``prefill_tokens[n]`` tokens per server, on expected
counts). A request is a prompt of ``P[n]`` tokens and ``O[n]`` output tokens, arriving at server
``n`` at rate ``lam[n]`` (Poisson) -- the fields of a ``WorkloadSummary``. With ``T_d`` and
``T_p`` the expected decode and prefill step times (one synchronous cluster step each)::

  prefill[n] = ceil(P[n] / prefill_tokens[n]) * T_p          its prompt's prefill steps
  decode[n]  = O[n] * T_d                                    one token per decode step
  work[n]    = (P[n] / prefill_tokens[n]) * T_p + O[n] * T_d / decode_batch[n]
  rho[n]     = lam[n] * work[n]                              utilisation of server n
  wait[n]    = rho[n] * work[n] / (2 (1 - rho[n]))           M/D/1 (Pollaczek-Khinchine)
  latency[n] = wait[n] + prefill[n] + decode[n]
  mean       = sum_n lam[n] latency[n] / sum_n lam[n]

``work`` is the server time a request occupies: its prefill steps (a prompt shares a prefill
step with ``prefill_tokens / P`` others) and ``1 / decode_batch`` of each of its decode steps.
Queueing is first order: each server is an M/D/1 queue whose deterministic service is ``work``
(continuous batching as one server of rate ``1 / work``); the wait is the mean wait of that queue.
Not modelled: prefill steps of newly admitted requests stretching the decode of running ones,
servers waiting for each other's steps beyond the step times, variance of lengths. When some
``rho[n] >= 1`` that server's queue diverges: its latency (and the mean) is ``inf`` and
``stable`` is False.

Attention over the context (``attention=True`` in :func:`expected_request_latency`, as the
simulator prices every step; :mod:`moe_edge.cost.attention`): a decode step of server ``n``
holds ``decode_batch[n]`` requests at the mean context ``P[n] + O[n] / 2`` (a request's decode
steps see contexts ``P + 1 .. P + O - 1``), one new token each; a prefill step holds
``prefill_tokens[n]`` prompt tokens of whole prompts of ``P[n]`` tokens (one chunk each, the
testbed's prompts fit a chunk), ``(P[n] + 1) / 2`` keys per token::

  decode:  bytes = kv * B_d (P + O/2)   flops = L f_kv B_d (P + O/2)
  prefill: bytes = kv * B_p             flops = L f_kv B_p (P + 1) / 2

(:func:`workload_attention`; ``kv`` the KV bytes per token, ``L f_kv`` the FLOPs of one
query-key pair over all layers). The work is placement-independent, so it moves both step times
by a constant of the workload (the roofline of weights plus caches, ``Hardware.dense_time``);
it matters for the queueing through ``rho``, not for a layer's time.

Both step times enter through the placement (the dense part does not depend on it), and the mean
is increasing and convex in ``(T_d, T_p)`` while stable; :func:`latency_gradient` gives its
partial derivatives, which the latency search (``placement/search.py``) uses to weigh a layer's
decode and prefill time.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_edge.config import ModelConfig
from moe_edge.core.errors import MoeEdgeError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost.attention import flops_per_key, kv_bytes_per_token


class RequestLatencyError(MoeEdgeError):
  """A workload summary that does not describe a servable workload."""


@dataclasses.dataclass(frozen=True)
class RequestLatency:
  """Expected request latency of a workload, per server and overall (seconds).

  Attributes:
    mean: rate-weighted mean over servers (``inf`` when some queue diverges).
    per_server: ``[N]`` expected latency of a request of each server.
    wait, prefill, decode: ``[N]`` its queueing wait, prefill and decode time.
    utilisation: ``[N]`` ``rho`` of each server.
    decode_step, prefill_step: the step times ``T_d`` and ``T_p`` used.
    stable: every ``rho < 1``.
  """
  mean: float
  per_server: np.ndarray
  wait: np.ndarray
  prefill: np.ndarray
  decode: np.ndarray
  utilisation: np.ndarray
  decode_step: float
  prefill_step: float
  stable: bool


def _terms(workload) -> tuple[np.ndarray, ...]:
  """``(lam, a, q, o, c)``: rates, prefill steps of work, ceil prefill steps, output tokens and
  decode work per decode step, each ``[N]`` (module docstring's notation)."""
  lam = np.asarray(workload.request_rate, dtype=np.float64)
  prompt = np.asarray(workload.prompt_tokens, dtype=np.float64)
  out = np.asarray(workload.output_tokens, dtype=np.float64)
  batch = np.asarray(workload.decode_batch, dtype=np.float64)
  chunk = np.asarray(workload.prefill_tokens, dtype=np.float64)
  shapes = {a.shape for a in (lam, prompt, out, batch, chunk)}
  if len(shapes) != 1 or lam.ndim != 1:
    raise RequestLatencyError(f"workload fields must all be [N] arrays, got shapes "
                              f"{sorted(shapes)}.")
  if np.any(~np.isfinite(lam)) or np.any(lam < 0) or lam.sum() <= 0:
    raise RequestLatencyError("request_rate must be finite, >= 0 and not all 0 (requests/s).")
  if np.any(prompt < 0) or np.any(out < 0) or not np.all(np.isfinite(prompt + out)):
    raise RequestLatencyError("prompt_tokens and output_tokens must be finite and >= 0.")
  if np.any(batch < 1) or np.any(chunk < 1):
    raise RequestLatencyError("decode_batch and prefill_tokens must be >= 1 per server; a "
                              "scheduler always forms at least one-token steps.")
  return lam, prompt / chunk, np.ceil(prompt / chunk), out, out / batch


def request_latency(decode_step: float, prefill_step: float, workload) -> RequestLatency:
  """The module docstring's formulas for step times ``T_d``, ``T_p`` (seconds).

  Args:
    workload: a ``WorkloadSummary`` (``request_rate``, ``prompt_tokens``, ``output_tokens``,
      ``decode_batch``, ``prefill_tokens``, each ``[N]``).
  """
  if not (decode_step >= 0 and prefill_step >= 0):
    raise RequestLatencyError(f"step times must be >= 0, got decode {decode_step}, prefill "
                              f"{prefill_step}.")
  lam, a, q, o, c = _terms(workload)
  work = a * prefill_step + c * decode_step
  rho = lam * work
  stable = bool(np.all(rho < 1.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    wait = np.where(rho < 1.0, rho * work / (2.0 * (1.0 - rho)), np.inf)
  prefill, decode = q * prefill_step, o * decode_step
  per = wait + prefill + decode
  w = lam / lam.sum()
  mean = float(np.sum(np.where(w > 0, w * per, 0.0))) if stable else float("inf")
  return RequestLatency(mean, per, wait, prefill, decode, rho, float(decode_step),
                        float(prefill_step), stable)


def latency_gradient(decode_step: float, prefill_step: float, workload) -> tuple[float, float]:
  """``(d mean / d T_d, d mean / d T_p)`` at the given step times (``inf`` when unstable).

  ``d wait / d work = lam work (2 - lam work) / (2 (1 - lam work)^2)``, chained through
  ``work = a T_p + c T_d``.
  """
  lam, a, q, o, c = _terms(workload)
  work = a * prefill_step + c * decode_step
  rho = lam * work
  if np.any(rho >= 1.0):
    return float("inf"), float("inf")
  dwait = rho * (2.0 - rho) / (2.0 * (1.0 - rho) ** 2)
  w = lam / lam.sum()
  return float(np.sum(w * (dwait * c + o))), float(np.sum(w * (dwait * a + q)))


def workload_batches(workload) -> tuple[np.ndarray, np.ndarray]:
  """``(decode [N], prefill [N])`` tokens per server of one decode and one prefill step."""
  return (np.asarray(workload.decode_batch, dtype=np.float64),
          np.asarray(workload.prefill_tokens, dtype=np.float64))


def workload_attention(model: ModelConfig, workload
                       ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """``((bytes [N], flops [N]) of a decode step, (bytes [N], flops [N]) of a prefill step)``:
  the attention work of the workload's mean steps (module docstring)."""
  _terms(workload)
  prompt = np.asarray(workload.prompt_tokens, dtype=np.float64)
  out = np.asarray(workload.output_tokens, dtype=np.float64)
  dec, pre = workload_batches(workload)
  kv, fk = float(kv_bytes_per_token(model)), float(model.n_layers * flops_per_key(model))
  context = dec * (prompt + 0.5 * out)                   # decode: summed contexts = keys
  return (kv * context, fk * context), (kv * pre, fk * pre * 0.5 * (prompt + 1.0))


def expected_request_latency(cost, problem: PlacementProblem, placement: Placement,
                             workload, attention: bool = False) -> RequestLatency:
  """:func:`request_latency` with the step times of ``placement`` from ``cost.expected``.

  Args:
    cost: a ``CostModel``; its expected decode step at ``decode_batch`` tokens per server and
      prefill step at ``prefill_tokens`` tokens per server give ``T_d`` and ``T_p``.
    attention: the steps also pay :func:`workload_attention` (as the simulator's steps do).
  """
  dec, pre = workload_batches(workload)
  att_d, att_p = workload_attention(cost.model, workload) if attention else (None, None)
  t_d = cost.expected(problem, placement, dec, phase="decode", attention=att_d).latency
  t_p = cost.expected(problem, placement, pre, phase="prefill", attention=att_p).latency
  return request_latency(t_d, t_p, workload)
