"""The workload of each model in the tables: a profiling trace to plan on, an evaluation trace
to cost on.

* ``olmoe_1b_7b``, ``mixtral_8x7b``: statistics-driven traces sampled from the models' real
  per-domain routing counts (:func:`moe_edge.workload.stats_traces.sample_stats_trace`), one home
  domain per server (server ``i`` -> ``DOMAINS[i % 5]``), locality ``alpha``.
* ``small_moe``: the trained checkpoint run over per-server request streams of real held-out text
  (:func:`moe_edge.workload.streams.make_streams`), its routing recorded
  (:func:`moe_edge.workload.record.record_trace`). The traces are cached as ``.npz`` under
  ``trace_cache`` (reruns are fast and replay the very same routing).
* ``deepseek_v2_lite``: statistics-driven traces as above, from OLMoE-1B-7B's real per-domain
  statistics reshaped to its 26 layers and top-6 (:func:`moe_edge.workload.standin.standin_stats`,
  :data:`~moe_edge.workload.standin.STANDIN_NOTE`): the same stand-in as the paper experiment
  (``experiments/paper_table.py``), so one model name means one workload.
* any other model (Qwen1.5-MoE): the small model's traces mapped to its shape
  (:mod:`moe_edge.experiments.trace_mapping`).

Profiling and evaluation traces come from the same distribution with different seeds
(``seed + profile_seed_offset`` and ``seed``): placements are planned on one and costed on the
other, so an activation-aware method is judged on tokens it did not see.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from moe_edge.config import ConfigError, ModelConfig, model_config
from moe_edge.experiments.config import ExperimentConfig
from moe_edge.experiments.trace_mapping import map_trace
from moe_edge.model.checkpoint import restore_checkpoint
from moe_edge.workload.record import record_trace
from moe_edge.workload.standin import STANDIN_NOTE, STANDINS, routing_stats_for
from moe_edge.workload.stats_traces import STATS_MODELS, sample_stats_trace
from moe_edge.workload.streams import make_streams
from moe_edge.workload.traces import ActivationTrace, TraceError

SMALL_MODEL = "small_moe"


def repo_path(path: str | Path) -> Path:
  """``path`` itself if absolute, else relative to the repository root."""
  p = Path(path)
  return p if p.is_absolute() else Path(__file__).resolve().parents[2] / p


def workload_kind(model: str) -> str:
  """``"stats"``, ``"standin"`` (another model's statistics, :data:`STANDINS`), ``"recorded"``
  (the small model) or ``"mapped"`` (everything else)."""
  if model in STATS_MODELS:
    return "stats"
  if model in STANDINS:
    return "standin"
  return "recorded" if model == SMALL_MODEL else "mapped"


def served_model(cfg: ExperimentConfig, name: str) -> ModelConfig:
  """The model preset with the experiment's weight format override (if any)."""
  model = model_config(name)
  b = cfg.served_bytes_per_param(name)
  return model if b is None else dataclasses.replace(model, bytes_per_param=b)


@dataclasses.dataclass(frozen=True)
class Workload:
  """One model's traces for one cluster size.

  Attributes:
    model: the served model config.
    profile: ``[T, L, k]`` trace the placements are planned on.
    trace: ``[T, L, k]`` trace the placements are costed on.
    kind: ``"stats"``, ``"standin"``, ``"recorded"`` or ``"mapped"``.
    note: the caption of this workload in the tables.
  """
  model: ModelConfig
  profile: ActivationTrace
  trace: ActivationTrace
  kind: str
  note: str


# --------------------------------------------------------------------------------------------
# Small model: recorded over real text, cached
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _small_model(checkpoint: str):
  path = repo_path(checkpoint)
  if not path.is_dir():
    raise ConfigError(f"no small-model checkpoint at {path}; train one with "
                      f"experiments/train_small_moe.py or drop small_moe (and the mapped "
                      f"models) from the experiment's models.")
  model, _, step = restore_checkpoint(path, model_config(SMALL_MODEL))
  return model, step


def _trace_params(cfg: ExperimentConfig, num_servers: int, seed: int) -> dict:
  return dict(num_servers=num_servers, requests_per_server=cfg.small_requests_per_server,
              seq_len=cfg.small_seq_len, alpha=cfg.alpha, seed=seed, split="heldout",
              checkpoint=cfg.checkpoint)


def record_small_trace(cfg: ExperimentConfig, num_servers: int, seed: int) -> ActivationTrace:
  """Run the small checkpoint over ``num_servers`` streams of real held-out text; record it."""
  model, step = _small_model(cfg.checkpoint)
  params = _trace_params(cfg, num_servers, seed)
  requests = make_streams(num_servers, cfg.small_requests_per_server, cfg.small_seq_len,
                          cfg.alpha, seed, split="heldout")
  note = json.dumps(dict(params, generator="moe_edge.experiments.workloads.record_small_trace",
                         checkpoint_step=int(step)))
  return record_trace(model, model_config(SMALL_MODEL), requests, num_servers, batch_size=32,
                      source="corpus/heldout (allenai/OLMoE 357454f texts)", note=note)


def small_trace(cfg: ExperimentConfig, num_servers: int, seed: int) -> ActivationTrace:
  """The recorded small-model trace, from ``cfg.trace_cache`` when it holds one made with the
  same parameters (else recorded and written there)."""
  if not cfg.trace_cache:
    return record_small_trace(cfg, num_servers, seed)
  p = _trace_params(cfg, num_servers, seed)
  name = (f"small_moe_{num_servers}srv_a{cfg.alpha:g}_seed{seed}_"
          f"{p['requests_per_server']}x{p['seq_len']}.npz")
  path = repo_path(cfg.trace_cache) / name
  if path.is_file():
    try:
      trace = ActivationTrace.load(path)
      note = json.loads(trace.note)
      if all(note.get(k) == v for k, v in p.items()):
        return trace
    except (TraceError, json.JSONDecodeError, ValueError):
      pass  # stale or foreign file: record again
  trace = record_small_trace(cfg, num_servers, seed)
  trace.save(path)
  return trace


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------
def build_workload(cfg: ExperimentConfig, name: str, num_servers: int,
                   small: tuple[ActivationTrace, ActivationTrace] | None = None,
                   small_note: str | None = None) -> Workload:
  """The profiling and evaluation traces of model ``name`` on ``num_servers`` servers.

  Args:
    small: ``(profile, trace)`` of the small model to use instead of recording (or loading)
      them; needed by ``small_moe`` and the mapped models.
    small_note: caption of ``small_moe``'s workload when ``small`` came from elsewhere.
  """
  model = served_model(cfg, name)
  kind = workload_kind(name)
  profile_seed = cfg.seed + cfg.profile_seed_offset
  if kind == "stats":
    sample = lambda seed: sample_stats_trace(  # noqa: E731
        name, num_servers, cfg.tokens_per_server, cfg.alpha, seed, request_len=cfg.request_len)
    note = (f"real routing statistics of {name} (allenai/OLMoE routing counts), one home domain "
            f"per server, alpha {cfg.alpha:g}")
    return Workload(model, sample(profile_seed), sample(cfg.seed), kind, note)
  if kind == "standin":
    stats, _ = routing_stats_for(name)
    sample = lambda seed: sample_stats_trace(  # noqa: E731
        stats, num_servers, cfg.tokens_per_server, cfg.alpha, seed, request_len=cfg.request_len)
    note = f"{STANDIN_NOTE}, one home domain per server, alpha {cfg.alpha:g}"
    return Workload(model, sample(profile_seed), sample(cfg.seed), kind, note)
  if small is None:
    small = (small_trace(cfg, num_servers, profile_seed), small_trace(cfg, num_servers, cfg.seed))
  for t in small:
    if t.num_servers != num_servers:
      raise TraceError(f"the small-model trace has {t.num_servers} servers but the cluster has "
                       f"{num_servers}; record it for this cluster.")
  if kind == "recorded":
    note = small_note or (f"own routing of the trained small model over real held-out text, "
                          f"alpha {cfg.alpha:g}")
    return Workload(model, small[0], small[1], kind, note)
  prof, trace = (map_trace(t, model, cfg.mapping_seed) for t in small)
  note = (f"driven by small-model traces mapped to {model.n_experts} experts (top-"
          f"{model.top_k}, {model.n_moe_layers} layers; trace_mapping.py)")
  return Workload(model, prof, trace, kind, note)


def split_trace(trace: ActivationTrace) -> tuple[ActivationTrace, ActivationTrace]:
  """``(first half, second half)`` of a trace by step: a profiling and an evaluation part."""
  steps = sorted(set(int(s) for s in trace.step))
  if len(steps) < 2:
    raise TraceError("a trace needs at least two steps to split into profiling and evaluation "
                     "halves; record more requests per server.")
  mid = steps[len(steps) // 2]
  return trace.select(trace.step < mid), trace.select(trace.step >= mid)
