"""The paper experiment's inputs: the testbed cluster per model, the request workloads, and the
placement problem every method plans on.

* :func:`testbed_cluster`: ``configs/clusters/paper_testbed.py`` with the model's memory cap and
  room for ``kv_reserve_requests`` requests' KV caches per GPU (``reserved_bytes``: placement
  leaves it free).
* :func:`workload_requests`: Poisson arrivals per server, each request's domain drawn with the
  workload's locality, a prompt of ``prompt_tokens`` (uniform, inclusive) from the held-out text
  of its domain, ``output_tokens`` to generate (:func:`moe_edge.workload.requests.make_requests`).
  :func:`shift_requests` joins two workloads at the shift time.
* :func:`expected_problem`: the :class:`PlacementProblem` of a workload from its routing
  statistics: ``freq[n, l, e] = top_k * sum_d q[n, d] p[d, l, e]`` with ``q`` the servers'
  domain mix and ``p`` the per-domain expert distributions the simulator samples from, and
  ``tokens[n]`` the server's token rate (requests/s x (mean prompt + output)). An ideal profiler:
  the methods plan on the workload's exact expectation and are judged on sampled routing.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from moe_edge.config import ClusterConfig, ConfigError, ModelConfig, cluster_config, model_config
from moe_edge.cost.attention import kv_reservation_bytes
from moe_edge.experiments.paper_config import PaperConfig, WorkloadSpec
from moe_edge.placement.problem import PlacementError, PlacementProblem
from moe_edge.workload.corpus import DOMAINS
from moe_edge.workload.requests import Requests, make_requests
from moe_edge.workload.standin import routing_stats_for
from moe_edge.workload.stats_traces import RoutingStats, layer_distributions
from moe_edge.workload.streams import domain_probabilities


def testbed_cluster(cfg: PaperConfig, model: str, num_gpus: int = 4,
                    link_mbps: float | None = None) -> ClusterConfig:
  """The testbed for ``model`` (its memory cap, KV room per GPU), checked to hold every expert
  once (ConfigError naming the shortfall and the fix otherwise)."""
  m = model_config(model)
  reserve = cfg.kv_reserve_requests * float(
      kv_reservation_bytes(m, cfg.prompt_tokens[1], cfg.output_tokens))
  cluster = cluster_config(cfg.cluster, memory_fraction=cfg.fraction(model),
                           link_mbps=cfg.link_mbps if link_mbps is None else link_mbps,
                           latency_s=cfg.latency_s, num_gpus=num_gpus,
                           pool_efficiency=cfg.pool_efficiency, kv_reserve_bytes=reserve)
  try:
    cluster.check_fits(m)
  except ConfigError as e:
    raise ConfigError(f"{e} (memory_fraction {cfg.fraction(model):g} for {model}; raise it or "
                      f"lower kv_reserve_requests)") from None
  return cluster


def homes_for(spec: WorkloadSpec, num_servers: int) -> tuple[str, ...]:
  """The workload's homes for ``num_servers`` servers (the configured ones, cycled)."""
  return tuple(spec.homes[i % len(spec.homes)] for i in range(num_servers))


def domain_mix(spec: WorkloadSpec, num_servers: int) -> np.ndarray:
  """``q [N, D]``: probability that a request of server ``n`` is from domain ``d``."""
  return domain_probabilities(homes_for(spec, num_servers), spec.alpha)


def stats_rows(stats: RoutingStats, spec: WorkloadSpec) -> np.ndarray:
  """``[D]`` row of each corpus domain in ``stats`` (ConfigError when the workload draws
  requests from a domain the statistics do not have)."""
  q = domain_mix(spec, len(spec.homes)).sum(0)
  missing = [d for i, d in enumerate(DOMAINS) if q[i] > 0 and d not in stats.domains]
  if missing:
    raise ConfigError(f"workload {spec.name!r} draws requests from {missing}, which the routing "
                      f"statistics of {stats.name} ({', '.join(stats.domains)}) do not have; "
                      f"use those domains or statistics that have them.")
  return np.array([stats.domains.index(d) if d in stats.domains else 0 for d in DOMAINS])


def workload_requests(cfg: PaperConfig, spec: WorkloadSpec, num_servers: int, duration_s: float,
                      seed: int) -> Requests:
  """Arrivals over ``duration_s`` seconds of workload ``spec`` (module docstring)."""
  return make_requests(num_servers, tuple(cfg.prompt_tokens), int(cfg.output_tokens), seed,
                       rate=1.0 / spec.interarrival_s, duration_s=duration_s, alpha=spec.alpha,
                       home_domains=homes_for(spec, num_servers), split="heldout")


def concat_requests(parts: list[tuple[Requests, float]]) -> Requests:
  """Requests of several workloads, each shifted by its start time, in arrival order."""
  server = np.concatenate([p.server for p, _ in parts]).astype(np.int32)
  arrival = np.concatenate([p.arrival_s + t0 for p, t0 in parts])
  domain = sum((p.domain for p, _ in parts), ())
  prompts = sum((p.prompts for p, _ in parts), ())
  out = np.concatenate([p.output_tokens for p, _ in parts]).astype(np.int32)
  order = np.lexsort((server, arrival))
  return Requests(server=server[order], arrival_s=arrival[order],
                  domain=tuple(domain[i] for i in order),
                  prompts=tuple(prompts[i] for i in order), output_tokens=out[order])


def shift_requests(cfg: PaperConfig, num_servers: int, seed: int) -> Requests:
  """``shift_from`` until ``shift_at_s``, then ``shift_to`` until ``shift_duration_s``."""
  first = workload_requests(cfg, cfg.workload(cfg.shift_from), num_servers, cfg.shift_at_s, seed)
  second = workload_requests(cfg, cfg.workload(cfg.shift_to), num_servers,
                             cfg.shift_duration_s - cfg.shift_at_s, seed + 1)
  return concat_requests([(first, 0.0), (second, cfg.shift_at_s)])


def expected_problem(model: ModelConfig, cluster: ClusterConfig, stats: RoutingStats,
                     cfg: PaperConfig, spec: WorkloadSpec) -> PlacementProblem:
  """The placement problem of workload ``spec`` (module docstring)."""
  n = cluster.num_servers
  q = domain_mix(spec, n)                                              # [N, D] corpus domains
  p = layer_distributions(stats)[stats_rows(stats, spec)]              # [D, L, E] same order
  freq = stats.top_k * np.einsum("nd,dle->nle", q, p)
  mean_tokens = 0.5 * (cfg.prompt_tokens[0] + cfg.prompt_tokens[1]) + cfg.output_tokens
  tokens = np.full(n, mean_tokens / spec.interarrival_s)
  try:
    return PlacementProblem.build(model, cluster, freq, tokens)
  except (ConfigError, PlacementError) as e:
    raise ConfigError(f"the cluster cannot hold every expert of {model.name} once: {e}") from None


@dataclasses.dataclass(frozen=True)
class Setting:
  """One (model, workload) of the table: the served model, its testbed, its statistics."""
  model: ModelConfig
  cluster: ClusterConfig
  stats: RoutingStats
  stats_note: str
  workload: WorkloadSpec
  problem: PlacementProblem


def build_setting(cfg: PaperConfig, model: str, workload: str, num_gpus: int = 4,
                  link_mbps: float | None = None) -> Setting:
  m = model_config(model)
  cluster = testbed_cluster(cfg, model, num_gpus, link_mbps)
  stats, note = routing_stats_for(model)
  spec = cfg.workload(workload)
  return Setting(m, cluster, stats, note, spec, expected_problem(m, cluster, stats, cfg, spec))


def offered_load(spec: WorkloadSpec) -> float:
  """Requests per second per server."""
  return 1.0 / spec.interarrival_s if math.isfinite(spec.interarrival_s) else 0.0
