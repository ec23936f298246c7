"""Throughput of the cost model: token-layer events per second of `evaluate` and `bytes_matrix`.

A synthetic trace at a real model's shapes (default OLMoE-1B-7B: L=16, E=64, k=8, on the
8-server edge cluster, T=200k tokens) is costed under a random placement, as decode steps of
each of --decode_batches tokens per server per step and as a single prefill batch; each timing
is the best of --repeats runs. One event = one token at one MoE layer (k choices each). Small
decode batches are the slowest case: many steps, each with its own exchange and its own set of
used experts.

  .venv/bin/python benchmarks/bench_cost.py
  .venv/bin/python benchmarks/bench_cost.py --model mixtral_8x7b --tokens 100000
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from absl import app, flags

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.cost import bytes_matrix, evaluate
from moe_edge.io import cli
from moe_edge.placement.problem import Placement
from moe_edge.workload.traces import ActivationTrace

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "olmoe_1b_7b", "Model config name.")
flags.DEFINE_string("cluster", "edge_hetero_8", "Cluster config name.")
flags.DEFINE_integer("tokens", 200_000, "Tokens in the synthetic trace (all servers).")
flags.DEFINE_list("decode_batches", ["1", "8", "32"], "Tokens per server per decode step.")
flags.DEFINE_float("copies", 2.0, "Expert memory as copies of all experts.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best is reported).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def random_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int,
                 num_servers: int, rng: np.random.Generator, model: str) -> ActivationTrace:
  """Tokens spread round robin over servers; each (token, layer) picks one of 4096 random top-k
  sets drawn with Zipf-like popularity; token t is decode step t // N of request t % N."""
  pool = np.argsort(rng.random((4096, num_experts)), axis=1)[:, :top_k].astype(np.int32)
  weight = 1.0 / np.arange(1, pool.shape[0] + 1)
  pick = rng.choice(pool.shape[0], size=(num_tokens, num_layers), p=weight / weight.sum())
  server = (np.arange(num_tokens) % num_servers).astype(np.int32)
  step = (np.arange(num_tokens) // num_servers).astype(np.int32)
  return ActivationTrace(
      expert_ids=pool[pick], gate_weights=np.full((num_tokens, num_layers, top_k), 1.0 / top_k,
                                                  np.float32),
      server=server, request=server.copy(),
      position=np.zeros(num_tokens, np.int32), step=step, model=model, num_experts=num_experts,
      num_servers=num_servers, source="synthetic (bench_cost.py)")


def random_placement(model, cluster, rng: np.random.Generator) -> Placement:
  """Every expert on one random server, then random replicas up to each server's capacity."""
  n, l, e = cluster.num_servers, model.n_moe_layers, model.n_experts
  cap = cluster.expert_capacity(model)
  hosts = np.zeros((n, l, e), dtype=bool)
  owner = rng.permutation(np.repeat(np.arange(n), np.ceil(l * e / n).astype(int)))[:l * e]
  hosts[owner, np.arange(l * e) // e, np.arange(l * e) % e] = True
  for s in range(n):
    free = np.flatnonzero(~hosts[s].ravel())
    extra = rng.choice(free, size=min(max(cap[s] - hosts[s].sum(), 0), free.size), replace=False)
    hosts[s].ravel()[extra] = True
  return Placement.from_hosts(hosts, model, cluster, method="random")


def best_seconds(fn, repeats: int) -> float:
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.check_flags(FLAGS, at_least_1=("tokens", "repeats"), at_least_0=("seed",),
                  ranges={"copies": (1.0, math.inf, False)})
  try:
    batches = [int(b) for b in FLAGS.decode_batches]
  except ValueError:
    raise app.UsageError(f"--decode_batches={','.join(FLAGS.decode_batches)} must be "
                         f"integers.") from None
  if not batches or min(batches) < 1:
    raise app.UsageError(f"--decode_batches={','.join(FLAGS.decode_batches)} must be one or "
                         f"more integers >= 1.")
  rng = np.random.default_rng(FLAGS.seed)
  model = model_config(FLAGS.model)
  cluster = cluster_config(FLAGS.cluster)
  cluster = with_expert_memory(cluster, model, FLAGS.copies)
  n, l, e, k = cluster.num_servers, model.n_moe_layers, model.n_experts, model.top_k
  trace = random_trace(FLAGS.tokens, l, e, k, n, rng, model.name)
  placement = random_placement(model, cluster, rng)
  events = trace.num_tokens * l
  print(f"model {model.name} (L={l}, E={e}, k={k}) on {cluster.name} (N={n}); "
        f"T={trace.num_tokens:,} tokens -> {events:,} token-layer events "
        f"({events * k:,} token-choices)")
  token = np.arange(trace.num_tokens)
  rows = []
  for b in batches:
    tr = dataclasses.replace(trace, step=(token // (n * b)).astype(np.int32))
    rows.append((f"evaluate decode ({b}/server/step, {int(tr.step.max()) + 1} steps)",
                 lambda tr=tr: evaluate(tr, model, cluster, placement, "decode")))
  prefill = dataclasses.replace(trace, step=np.zeros(trace.num_tokens, np.int32))
  rows.append(("evaluate prefill (1 step)",
               lambda: evaluate(prefill, model, cluster, placement, "prefill")))
  rows.append(("bytes_matrix", lambda: bytes_matrix(trace, placement, model.activation_bytes)))
  print(f"{'what':<48} {'seconds':>9} {'events/s':>14}")
  for name, fn in rows:
    sec = best_seconds(fn, FLAGS.repeats)
    print(f"{name:<48} {sec:9.3f} {events / sec:14,.0f}")


if __name__ == "__main__":
  cli.run(main)
