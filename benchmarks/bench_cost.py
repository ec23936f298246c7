"""Throughput of the cost model: token-layer events per second of `evaluate` and `bytes_matrix`.

A synthetic trace at a real model's shapes (default OLMoE-1B-7B: L=16, E=64, k=8, on the
8-server edge cluster, T=200k tokens) is costed under a random placement, once as decode steps
(--decode_batch tokens per server per step) and once as a single prefill batch; each timing is
the best of --repeats runs. One event = one token at one MoE layer (k choices each).

  .venv/bin/python benchmarks/bench_cost.py
  .venv/bin/python benchmarks/bench_cost.py --model mixtral_8x7b --tokens 100000
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.cost import bytes_matrix, evaluate
from moe_edge.placement.problem import Placement
from moe_edge.workload.traces import ActivationTrace

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "olmoe_1b_7b", "Model config name.")
flags.DEFINE_string("cluster", "edge_hetero_8", "Cluster config name.")
flags.DEFINE_integer("tokens", 200_000, "Tokens in the synthetic trace (all servers).")
flags.DEFINE_integer("decode_batch", 32, "Tokens per server per decode step.")
flags.DEFINE_float("copies", 2.0, "Expert memory as copies of all experts.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best is reported).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def random_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int,
                 num_servers: int, decode_batch: int, rng: np.random.Generator,
                 model: str) -> ActivationTrace:
  """Tokens spread evenly over servers; each (token, layer) picks one of 4096 random top-k sets
  drawn with Zipf-like popularity; decode steps of ``decode_batch`` tokens per server."""
  pool = np.argsort(rng.random((4096, num_experts)), axis=1)[:, :top_k].astype(np.int32)
  weight = 1.0 / np.arange(1, pool.shape[0] + 1)
  pick = rng.choice(pool.shape[0], size=(num_tokens, num_layers), p=weight / weight.sum())
  server = (np.arange(num_tokens) % num_servers).astype(np.int32)
  step = (np.arange(num_tokens) // (num_servers * decode_batch)).astype(np.int32)
  return ActivationTrace(
      expert_ids=pool[pick], gate_weights=np.full((num_tokens, num_layers, top_k), 1.0 / top_k,
                                                  np.float32),
      server=server, request=np.arange(num_tokens, dtype=np.int32) % (num_servers * decode_batch),
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
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  model = model_config(FLAGS.model)
  cluster = cluster_config(FLAGS.cluster)
  cluster = with_expert_memory(cluster, model, FLAGS.copies)
  n, l, e, k = cluster.num_servers, model.n_moe_layers, model.n_experts, model.top_k
  trace = random_trace(FLAGS.tokens, l, e, k, n, FLAGS.decode_batch, rng, model.name)
  prefill = trace.select(np.ones(trace.num_tokens, bool))
  prefill = ActivationTrace(**{**{f: getattr(prefill, f) for f in (
      "expert_ids", "gate_weights", "server", "request", "position", "model", "num_experts",
      "num_servers", "source")}, "step": np.zeros(trace.num_tokens, np.int32)})
  placement = random_placement(model, cluster, rng)
  events = trace.num_tokens * l
  print(f"model {model.name} (L={l}, E={e}, k={k}) on {cluster.name} (N={n}); "
        f"T={trace.num_tokens:,} tokens -> {events:,} token-layer events "
        f"({events * k:,} token-choices)")
  rows = [
      (f"evaluate decode ({FLAGS.decode_batch}/server/step, "
       f"{int(trace.step.max()) + 1} steps)",
       lambda: evaluate(trace, model, cluster, placement, "decode")),
      ("evaluate prefill (1 step)", lambda: evaluate(prefill, model, cluster, placement,
                                                     "prefill")),
      ("bytes_matrix", lambda: bytes_matrix(trace, placement, model.activation_bytes)),
  ]
  print(f"{'what':<48} {'seconds':>9} {'events/s':>14}")
  for name, fn in rows:
    sec = best_seconds(fn, FLAGS.repeats)
    print(f"{name:<48} {sec:9.3f} {events / sec:14,.0f}")
  rep = evaluate(trace, model, cluster, placement, "decode")
  print(f"(decode: {1e3 * rep.latency:.2f} ms/token, coverage {rep.coverage:.3f}, "
        f"{rep.cross_bytes_per_token / 1e3:.1f} kB/token across servers)")


if __name__ == "__main__":
  app.run(main)
