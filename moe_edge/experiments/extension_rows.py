"""The two routing extensions (``moe_edge/extensions``) as extra rows of the tables and a sweep.

Both start from the DanceMoE placement of a table setting and the evaluation trace's recorded
routing ``[T, L, k]``, transform that routing layer by layer with the placement's hosts, and cost
the result with the tables' cost model (:func:`moe_edge.experiments.costing.cost_placement`):

* ``dancemoe+subst(tau)`` -- :func:`moe_edge.extensions.substitution.substitute`: a remote
  choice with gate ``< tau`` is replaced by the most similar local expert (routed output
  similarity, :func:`moe_edge.extensions.similarity.calibration_similarity`, on calibration
  text from the corpus' *train* split). Needs the model's weights: ``small_moe`` only.
* ``dancemoe+budget(B)`` -- :func:`moe_edge.extensions.budgeted.budgeted_selection` with the
  forced top-1 and a latency budget per token and layer of ``B`` times the cluster's mean cost
  of one remote choice (:func:`~moe_edge.extensions.budgeted.choice_cost_matrix`, kind
  ``latency``); the other choices run only within it. ``small_moe`` only.
* ``dancemoe+drop(tau)`` -- :func:`moe_edge.extensions.substitution.drop_remote`: remote choices
  with gate ``< tau`` are skipped. Weight-free, so it also applies to the statistics-driven
  (and mapped) models, whose loss cannot be measured.

The loss change (``delta_nll``, nats per byte) of ``small_moe`` is measured on the evaluation
trace's own token ids: the held-out requests are regenerated deterministically with the
workload's settings (:func:`moe_edge.workload.streams.make_streams`, as
:func:`moe_edge.experiments.workloads.record_small_trace` made them), and the model is run with
the transform inside every MoE layer (:class:`moe_edge.extensions.harness.Runner`), against the
same runner at knob 0 (which is the plain model). Inside the model a layer's transform also
changes what later layers see; the costed routing is the recorded one transformed layer by layer
(so ``tau = 0`` gives exactly the plain DanceMoE row).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, cluster_config, model_config
from moe_edge.config import with_expert_memory
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.trace import ActivationTrace
from moe_edge.experiments import calibration as calib
from moe_edge.experiments.config import ExperimentConfig
from moe_edge.experiments.costing import cost_placement, phase_traces, report_metrics
from moe_edge.experiments.workloads import SMALL_MODEL, _small_model, small_trace
from moe_edge.extensions import budgeted, harness, substitution
from moe_edge.extensions.budgeted import budgeted_selection, choice_cost_matrix
from moe_edge.extensions.harness import Workload
from moe_edge.extensions.similarity import calibration_similarity
from moe_edge.extensions.substitution import drop_remote, substitute
from moe_edge.extensions.transform import TransformedMoE
from moe_edge.placement import registry
from moe_edge.placement.registry import PlacementContext
from moe_edge.workload.corpus import DOMAINS
from moe_edge.workload.streams import make_streams

NO_WEIGHTS = "n/a (no weights)"


def subst_label(tau: float) -> str:
  return f"dancemoe+subst({tau:g})"


def budget_label(b: float) -> str:
  return f"dancemoe+budget({b:g})"


def drop_label(tau: float) -> str:
  return f"dancemoe+drop({tau:g})"


# --------------------------------------------------------------------------------------------
# Routing transforms on a recorded trace
# --------------------------------------------------------------------------------------------
def _per_layer(trace: ActivationTrace, fn) -> ActivationTrace:
  """``trace`` with ``fn(layer, ids [T, k], gates [T, k], server [T]) -> (ids, gates)`` applied
  at every layer."""
  ids, gates = [], []
  server = jnp.asarray(trace.server, jnp.int32)
  for l in range(trace.expert_ids.shape[1]):
    i, g = fn(l, jnp.asarray(trace.expert_ids[:, l]), jnp.asarray(trace.gate_weights[:, l]),
              server)
    ids.append(np.asarray(i, np.int32))
    gates.append(np.maximum(np.asarray(g, np.float32), 0.0))
  return dataclasses.replace(trace, expert_ids=np.stack(ids, axis=1),
                             gate_weights=np.stack(gates, axis=1))


@jax.jit
def _substitute(ids, gates, server, hosts, sim, threshold):
  return substitute(ids, gates, server, hosts, sim, threshold)[:2]


@jax.jit
def _drop(ids, gates, server, hosts, threshold):
  return drop_remote(ids, gates, server, hosts, threshold, renormalize=False)[:2]


@jax.jit
def _budgeted(ids, gates, server, hosts, cost_matrix, budget):
  sel = budgeted_selection(ids, gates, server, hosts, cost_matrix, budget, force_top1=True)
  return sel.expert_ids, sel.gates


def substituted_trace(trace: ActivationTrace, hosts: np.ndarray, sim: np.ndarray,
                      threshold: float) -> ActivationTrace:
  """``trace`` after :func:`~moe_edge.extensions.substitution.substitute` at every layer
  (``hosts [N, L, E]``, ``sim [L, E, E]``)."""
  h, s = jnp.asarray(hosts, bool), jnp.asarray(sim, jnp.float32)
  return _per_layer(trace, lambda l, i, g, srv: _substitute(i, g, srv, h[:, l], s[l],
                                                             jnp.float32(threshold)))


def dropped_trace(trace: ActivationTrace, hosts: np.ndarray, threshold: float) -> ActivationTrace:
  """``trace`` after :func:`~moe_edge.extensions.substitution.drop_remote` (raw gates)."""
  h = jnp.asarray(hosts, bool)
  return _per_layer(trace, lambda l, i, g, srv: _drop(i, g, srv, h[:, l],
                                                       jnp.float32(threshold)))


def latency_budget(model: ModelConfig, cluster: ClusterConfig, remote_choices: float,
                   calibration=None) -> tuple[np.ndarray, float]:
  """``(cost [N, N] seconds per token-choice, budget seconds per token and layer)``: the budget
  is ``remote_choices`` times the mean off-diagonal cost (one remote choice), priced on
  ``Hardware.build(model, cluster, calibration)``."""
  cm = choice_cost_matrix(model, cluster, "latency",
                          hardware=Hardware.build(model, cluster, calibration))
  off = ~np.eye(cm.shape[0], dtype=bool)
  return cm, float(remote_choices * cm[off].mean())


def budgeted_trace(trace: ActivationTrace, hosts: np.ndarray, cost_matrix: np.ndarray,
                   budget: float) -> ActivationTrace:
  """``trace`` after :func:`~moe_edge.extensions.budgeted.budgeted_selection` (greedy, forced
  top-1, dropped choices parked on unused local experts)."""
  h, cm = jnp.asarray(hosts, bool), jnp.asarray(cost_matrix, jnp.float32)
  return _per_layer(trace, lambda l, i, g, srv: _budgeted(i, g, srv, h[:, l], cm,
                                                           jnp.float32(budget)))


# --------------------------------------------------------------------------------------------
# The small model: similarity on calibration text, loss on the evaluation trace's tokens
# --------------------------------------------------------------------------------------------
def _model(cfg: ExperimentConfig):
  return _small_model(cfg.checkpoint)[0]


@lru_cache(maxsize=4)
def _similarity(checkpoint: str, num_servers: int, requests: int, seq_len: int, alpha: float,
                seed: int) -> np.ndarray:
  reqs = make_streams(num_servers, requests, seq_len, alpha, seed, split="train")
  tokens = np.stack([r.tokens for r in reqs]).astype(np.int32)
  return calibration_similarity(_small_model(checkpoint)[0], tokens)


def calibration_sim(cfg: ExperimentConfig) -> np.ndarray:
  """``[L, E, E]`` routed output similarity of ``small_moe`` on ``cfg.extension_calib_requests``
  requests per stream of *train* text, one stream per corpus domain (seed ``cfg.seed + 1``; a
  property of the model, shared by every cluster)."""
  return _similarity(cfg.checkpoint, len(DOMAINS), cfg.extension_calib_requests,
                     cfg.small_seq_len, cfg.alpha, cfg.seed + 1)


def heldout_workload(cfg: ExperimentConfig, trace: ActivationTrace):
  """The evaluation trace's requests, regenerated with the workload's settings, as a
  :class:`moe_edge.extensions.harness.Workload` (inputs ``S - 1`` tokens, next-token targets).
  Checks that the regenerated requests are the trace's (servers, ids, lengths)."""
  reqs = make_streams(trace.num_servers, cfg.small_requests_per_server, cfg.small_seq_len,
                      cfg.alpha, cfg.seed, split="heldout")
  reqs = sorted(reqs, key=lambda r: (r.step, r.server, r.request_id))
  first = trace.position == 0
  if (len(reqs) != int(first.sum()) or
      not np.array_equal([r.request_id for r in reqs], trace.request[first]) or
      not np.array_equal([r.server for r in reqs], trace.server[first])):
    raise ValueError("the regenerated held-out requests do not match the evaluation trace; "
                     "delete the cached trace under trace_cache and rerun.")
  return Workload(np.stack([r.tokens for r in reqs]).astype(np.int32),
                  np.array([r.server for r in reqs], np.int32),
                  np.array([r.request_id for r in reqs], np.int32),
                  np.array([r.step for r in reqs], np.int32),
                  np.array([r.domain for r in reqs]), trace.num_servers)


@lru_cache(maxsize=1)
def _runners(batch_rows: int = 16):
  subst = harness.Runner(lambda server, t, knob: substitution.substitution_moe_fn(
      t["hosts"], t["sim"], server, knob, record=True), batch_rows)
  drop = harness.Runner(lambda server, t, knob: TransformedMoE(
      substitution.drop_remote_transform(t["hosts"], server, knob, renormalize=False),
      record=True), batch_rows)
  budget = harness.Runner(lambda server, t, knob: budgeted.budget_moe_fn(
      t["hosts"], t["cost"], server, knob, record=True), batch_rows)
  return dict(subst=subst, drop=drop, budget=budget)


def mean_nll(cfg: ExperimentConfig, work, family: str, tables: dict, knob: float) -> float:
  """Mean next-token NLL (nats/byte) of ``small_moe`` on ``work`` with transform ``family``
  (``subst``, ``drop`` or ``budget``) at ``knob``; knob 0 of ``subst``/``drop`` is the plain
  model."""
  res = _runners()[family](_model(cfg), work, tables, knob)
  return float(res.nll.mean())


# --------------------------------------------------------------------------------------------
# Table rows
# --------------------------------------------------------------------------------------------
def extension_rows(cfg: ExperimentConfig, model_name: str, model: ModelConfig,
                   cluster: ClusterConfig, trace: ActivationTrace, placement: Placement,
                   base_row: dict, cost, with_weights: bool,
                   calibration=None) -> list[dict]:
  """Extra rows of one table setting.

  Args:
    calibration: the setting's calibration (the budget's latency costs are priced on it).
    base_row: the plain DanceMoE row (its keys are copied, the metrics replaced).
    cost: ``trace -> metrics dict`` (the tables' cost model on ``trace``'s phases).
    with_weights: the model has real weights (``small_moe``): substitution and budget rows with
      a measured loss change; otherwise only the drop row, loss ``n/a``.
  """
  tau = cfg.substitution_threshold
  rows = []

  def row(method, new_trace, delta, note):
    r = dict(base_row, method=method, **cost(new_trace), delta_nll=delta, extension=note)
    r.pop("objective", None), r.pop("gap_to_ilp", None)
    rows.append(r)

  if not with_weights:
    row(drop_label(tau), dropped_trace(trace, placement.hosts, tau), NO_WEIGHTS,
        f"remote choices with gate < {tau:g} dropped")
    return rows
  sim = calibration_sim(cfg)
  cm, budget = latency_budget(model, cluster, cfg.budget_remote_choices, calibration)
  work = heldout_workload(cfg, trace)
  hosts = np.asarray(placement.hosts, bool)
  base = mean_nll(cfg, work, "subst", dict(hosts=hosts, sim=sim), 0.0)
  row(subst_label(tau), substituted_trace(trace, hosts, sim, tau),
      mean_nll(cfg, work, "subst", dict(hosts=hosts, sim=sim), tau) - base,
      f"remote choices with gate < {tau:g} substituted by the most similar local expert")
  row(budget_label(cfg.budget_remote_choices), budgeted_trace(trace, hosts, cm, budget),
      mean_nll(cfg, work, "budget", dict(hosts=hosts, cost=cm), budget) - base,
      f"top-1 forced, others within {1e3 * budget:.3f} ms per token and layer")
  return rows


# --------------------------------------------------------------------------------------------
# The ablation sweep
# --------------------------------------------------------------------------------------------
def sweep_extensions(cfg: ExperimentConfig, tick) -> list[dict]:
  """Substitution and drop at every ``cfg.extension_thresholds`` on ``small_moe`` on
  ``cfg.sweep_cluster``: rows ``{sweep, x (tau), method (subst / drop), decode_ms, prefill_ms,
  cross_kb_per_token, coverage, bytes_saved, latency_ratio, delta_nll, ...}``."""
  model = model_config(SMALL_MODEL)
  cluster = with_expert_memory(cluster_config(cfg.sweep_cluster, link_gbps=cfg.link_gbps), model,
                               cfg.copies)
  n = cluster.num_servers
  profile = small_trace(cfg, n, cfg.seed + cfg.profile_seed_offset)
  trace = small_trace(cfg, n, cfg.seed)
  cal = calib.edge_calibration(cfg.calibration, cluster, SMALL_MODEL)
  problem = PlacementProblem.from_trace(profile, model, cluster, calibration=cal)
  placement = registry.place("dancemoe", problem, None, PlacementContext(seed=cfg.seed))
  placement.validate(problem)
  hosts = np.asarray(placement.hosts, bool)

  def cost(t):
    return report_metrics(cost_placement(placement, phase_traces(
        t, "both", cfg.decode_batch, cfg.prefill_requests), model, cluster, cal))

  plain = cost(trace)
  sim = calibration_sim(cfg)
  work = heldout_workload(cfg, trace)
  tables = dict(hosts=hosts, sim=sim)
  base_nll = mean_nll(cfg, work, "subst", tables, 0.0)
  rows = []
  for tau in cfg.extension_thresholds:
    for method, new, family in (("subst", substituted_trace(trace, hosts, sim, tau), "subst"),
                                ("drop", dropped_trace(trace, hosts, tau), "drop")):
      m = cost(new)
      nll = base_nll if tau == 0 else mean_nll(cfg, work, family, tables, tau)
      rows.append(dict(sweep="extensions", x=float(tau), setting=f"tau {tau:g}",
                       model=SMALL_MODEL, cluster=cluster.name, servers=n, method=method, **m,
                       bytes_saved=1.0 - m["cross_kb_per_token"] / plain["cross_kb_per_token"],
                       latency_ratio=m["decode_ms"] / plain["decode_ms"], nll=nll,
                       delta_nll=nll - base_nll))
    tick(f"extensions tau {tau:g}")
  return rows


__all__ = ("NO_WEIGHTS", "budget_label", "budgeted_trace", "calibration_sim", "drop_label",
           "dropped_trace", "extension_rows", "heldout_workload", "latency_budget", "mean_nll",
           "subst_label", "substituted_trace", "sweep_extensions")
