"""Evaluation harness: run a routing transform in the model over real text and cost the result.

Used by ``experiments/substitution_sweep.py`` and ``experiments/budget_sweep.py``:

1. :func:`make_workload` -- per-server request streams of real text (``workload.streams``), each
   request ``seq_len + 1`` byte tokens (inputs and next-token targets).
2. :func:`calibrate` -- run the plain model over a calibration workload; return the MoE inputs
   (for output similarity) and the routing as an ActivationTrace (for the placement).
3. :class:`Runner` -- one jitted forward per transform family: ``make_moe_fn(server, tables,
   knob)`` builds the ``moe_fn`` *inside* the jitted function, so the transform's tables and its
   knob (threshold, tolerance, budget) are traced arguments and a sweep compiles once. Returns
   per-token NLL and each layer's routing before and after the transform.
4. :func:`routing_trace` + :func:`cost_summary` -- the transformed routing as an
   ActivationTrace, costed by ``moe_edge.cost.evaluate`` (decode steps) and by the energy model.

:func:`prepare` does the common set-up of both sweeps: model, cluster with expert memory for a
number of copies, a calibration workload on the train split (placement and similarities are
fitted on it) and a disjoint held-out workload (what the sweeps measure). The sweeps' settings
(ml_collections presets, validated) are :mod:`moe_edge.experiments.extension_settings`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_edge.config import (ClusterConfig, ModelConfig, cluster_config, model_config,
                             with_expert_memory)
from moe_edge.cost import decode_batches, evaluate
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.extensions.similarity import capture_moe_inputs
from moe_edge.extensions.transform import TransformedMoE, identity_transform
from moe_edge.model.checkpoint import restore_checkpoint
from moe_edge.model.transformer import MoETransformer
from moe_edge.placement import place
from moe_edge.workload.streams import make_streams


@dataclasses.dataclass(frozen=True)
class Workload:
  """``M`` requests: ``tokens [M, S+1] int32``, ``server, request, step [M] int32``,
  ``domain [M]`` str."""
  tokens: np.ndarray
  server: np.ndarray
  request: np.ndarray
  step: np.ndarray
  domain: np.ndarray
  num_servers: int

  @property
  def seq_len(self) -> int:
    """Model input length ``S`` (one less than the stored tokens)."""
    return self.tokens.shape[1] - 1


def make_workload(num_servers: int, requests_per_server: int, seq_len: int, alpha: float,
                  seed: int, split: str = "heldout") -> Workload:
  """Streams of ``requests_per_server`` requests per server, ``seq_len + 1`` tokens each; server
  ``i``'s home domain is ``DOMAINS[i % 5]`` (share ``alpha`` of its requests)."""
  reqs = make_streams(num_servers, requests_per_server, seq_len + 1, alpha, seed, split=split)
  return Workload(np.stack([r.tokens for r in reqs]).astype(np.int32),
                  np.array([r.server for r in reqs], np.int32),
                  np.array([r.request_id for r in reqs], np.int32),
                  np.array([r.step for r in reqs], np.int32),
                  np.array([r.domain for r in reqs]), num_servers)


def load_model(cfg: ModelConfig, checkpoint: str, seed: int = 0):
  """``(model, description)`` from a checkpoint directory, or random init for ``"none"``."""
  if checkpoint.lower() == "none":
    return MoETransformer(cfg, nnx.Rngs(seed)), f"random init (seed {seed})"
  path = Path(checkpoint)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}; train one with "
                            f"experiments/train_small_moe.py or pass --checkpoint none.")
  model, _, step = restore_checkpoint(path, cfg)
  return model, f"{path} (step {step})"


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunResult:
  """Per request row: ``nll [M, S]`` nats; ``expert_ids_in, gates_in`` (router) and
  ``expert_ids, gates, changed`` (after the transform), all ``[M, S, L, k]``."""
  nll: np.ndarray
  expert_ids_in: np.ndarray
  gates_in: np.ndarray
  expert_ids: np.ndarray
  gates: np.ndarray
  changed: np.ndarray


MakeMoeFn = Callable[[jax.Array, dict, jax.Array], TransformedMoE]


class Runner:
  """Jitted ``(model, workload, tables, knob) -> RunResult`` for one transform family.

  ``make_moe_fn(server [B] int32, tables {name: array}, knob f32 scalar)`` must return a
  recording :class:`TransformedMoE` (``record=True``).
  """

  def __init__(self, make_moe_fn: MakeMoeFn, batch_rows: int = 16):
    self.batch_rows = int(batch_rows)

    @nnx.jit
    def forward(model, tokens, server, tables, knob):
      fn = make_moe_fn(server, tables, knob)
      logits, _ = model(tokens[:, :-1], moe_fn=fn)
      logz = jax.nn.logsumexp(logits, axis=-1)
      picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
      r = fn.stacked()
      return (logz - picked, r["expert_ids_in"], r["gates_in"], r["expert_ids"], r["gates"],
              r["changed"])

    self._forward = forward

  def __call__(self, model, workload: Workload, tables: dict, knob: float) -> RunResult:
    m, b = workload.tokens.shape[0], self.batch_rows
    parts = []
    tables = {k: jnp.asarray(v) for k, v in tables.items()}
    for lo in range(0, m, b):
      rows = np.arange(lo, min(lo + b, m))
      pad = np.concatenate([rows, np.repeat(rows[:1], b - rows.size)])  # one compiled shape
      out = self._forward(model, jnp.asarray(workload.tokens[pad]),
                          jnp.asarray(workload.server[pad]), tables, jnp.float32(knob))
      parts.append([np.asarray(o)[:rows.size] for o in out])
    return RunResult(*(np.concatenate(p) for p in zip(*parts)))


def plain_runner(batch_rows: int = 16) -> Runner:
  """Runner of the unmodified model (records the router's routing)."""
  return Runner(lambda server, tables, knob: TransformedMoE(identity_transform, record=True),
                batch_rows)


def calibrate(model, workload: Workload, cfg: ModelConfig, batch_rows: int = 16
              ) -> tuple[np.ndarray, ActivationTrace]:
  """MoE inputs ``x [L, M*S, d]`` of the plain model on ``workload`` and its routing trace."""
  xs = [capture_moe_inputs(model, workload.tokens[lo:lo + batch_rows, :-1])[0]
        for lo in range(0, workload.tokens.shape[0], batch_rows)]
  res = plain_runner(batch_rows)(model, workload, {}, 0.0)
  return np.concatenate(xs, axis=1), routing_trace(workload, res.expert_ids, res.gates, cfg,
                                                   "calibration")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a sweep needs (see :func:`prepare`); ``calib_x [L, T, d]``."""
  cfg: ModelConfig
  model: object
  origin: str
  cluster: ClusterConfig
  placement: Placement
  calib_x: np.ndarray
  calib_trace: ActivationTrace
  heldout: Workload


def prepare(model_name: str, checkpoint: str, cluster_name: str, link_gbps: float,
            copies: float, method: str, alpha: float, requests_per_server: int,
            calib_requests_per_server: int, seq_len: int, seed: int,
            batch_rows: int = 16) -> Setup:
  """Model, cluster (expert memory for ``copies`` copies), calibration (train split, seed + 1),
  the ``method`` placement fitted on the calibration routing, and the held-out workload."""
  cfg = model_config(model_name)
  model, origin = load_model(cfg, checkpoint, seed)
  cluster = with_expert_memory(cluster_config(cluster_name, link_gbps=link_gbps), cfg, copies)
  n = cluster.num_servers
  calib = make_workload(n, calib_requests_per_server, seq_len, alpha, seed + 1, "train")
  heldout = make_workload(n, requests_per_server, seq_len, alpha, seed, "heldout")
  x, calib_trace = calibrate(model, calib, cfg, batch_rows)
  problem = PlacementProblem.from_trace(calib_trace, cfg, cluster)
  placement = place(method, problem, seed=seed)
  placement.validate(problem)
  return Setup(cfg, model, origin, cluster, placement, x, calib_trace, heldout)


# --------------------------------------------------------------------------------------------
# Costing
# --------------------------------------------------------------------------------------------
def routing_trace(workload: Workload, expert_ids: np.ndarray, gates: np.ndarray,
                  cfg: ModelConfig, note: str = "") -> ActivationTrace:
  """ActivationTrace of routing ``[M, S, L, k]`` on ``workload`` (one row per input token)."""
  m, s, l, k = expert_ids.shape
  rep = lambda a: np.repeat(a, s).astype(np.int32)
  return ActivationTrace(
      expert_ids=expert_ids.reshape(m * s, l, k).astype(np.int32),
      gate_weights=np.maximum(gates, 0.0).reshape(m * s, l, k).astype(np.float32),
      server=rep(workload.server), request=rep(workload.request),
      position=np.tile(np.arange(s, dtype=np.int32), m), step=rep(workload.step),
      model=cfg.name, num_experts=cfg.n_experts, num_servers=workload.num_servers,
      source="corpus (moe_edge.extensions.harness)", note=note)


def routing_energy(expert_ids: np.ndarray, server: np.ndarray, route: np.ndarray,
                   energy_cost: np.ndarray, run: np.ndarray | None = None) -> np.ndarray:
  """``[T]`` joules of the routed experts of every token.

  Args:
    expert_ids: ``[T, L, k]``; server: ``[T]``; route: ``[N, L, E]`` (the server computing each
      choice); energy_cost: ``[N, N]`` joules per token-choice (``budgeted.choice_cost_matrix``
      with ``kind="energy"``); run: ``[T, L, k]`` bool, choices that really run (default all).
  """
  t, l, k = expert_ids.shape
  dest = route[server[:, None, None], np.arange(l)[None, :, None], expert_ids]  # [T, L, k]
  e = energy_cost[np.broadcast_to(server[:, None, None], dest.shape), dest]
  if run is not None:
    e = np.where(run, e, 0.0)
  return e.sum(axis=(1, 2))


def cost_summary(trace: ActivationTrace, cfg: ModelConfig, cluster: ClusterConfig,
                 placement: Placement, decode_batch: int, energy_cost: np.ndarray,
                 run: np.ndarray | None = None) -> dict:
  """Cost-model numbers of ``trace`` regrouped into decode steps of ``decode_batch`` requests
  per server, plus energy: ``decode_ms`` (per step), ``exchange_ms``, ``coverage``,
  ``cross_kb_per_token``, ``energy_uj_per_token`` (routed experts only)."""
  rep = evaluate(decode_batches(trace, decode_batch), cfg, cluster, placement, "decode")
  joules = routing_energy(trace.expert_ids, trace.server, placement.route, energy_cost, run)
  return dict(decode_ms=1e3 * rep.latency, exchange_ms=1e3 * rep.exchange_time,
              coverage=rep.coverage, cross_kb_per_token=rep.cross_bytes_per_token / 1e3,
              energy_uj_per_token=1e6 * float(joules.mean()))
