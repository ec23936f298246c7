"""Decode speed with and without the KV cache, on one device and on the 4-server runtime.

The shipped ``small_moe`` (context 256) generates 32, 96 and 192 tokens greedily after a
64-token prompt of real held-out text:

* one device: :func:`moe_edge.model.transformer.generate` (no cache: every token re-runs the
  model over the whole ``[1, 64 + n]`` buffer) against :func:`moe_edge.model.decoding.
  generate_cached` (prefill once, then one position per step, all decode steps in one compiled
  loop); both with the same routed-expert compute, :func:`moe_edge.model.decoding.
  sparse_moe_fn` (gathers the chosen experts when there are fewer choices than experts, else
  the dense reference);
* 4 servers (host CPU devices, a DanceMoE-style placement planned on uniform statistics): the
  cache-free :meth:`ServingRuntime.generate` against the engine (one request per server,
  continuous batching, per-server KV caches), both after compilation; the cache-free side is
  timed once (minutes per run at 192 tokens on 2 cores), the engine best of ``--repeats``.

Tokens/s = new tokens / wall time of the whole generation (prompt included, compilation
excluded; best of ``--repeats``). ``speedup[n]`` = cached / cache-free tokens/s on one device,
``speedup_4_servers[n]`` on the runtime. Also the cached per-token time at positions 64-95 and
224-255 (one device; two caches decoded in alternation), whose ratio is the growth of the
per-token time with the context. Cache-free and cached runs alternate on one device.
Same process, same devices for every pair. Writes ``--out`` (JSON).

  .venv/bin/python benchmarks/bench_kv_cache.py   # -> results/bench_kv_cache/cpu.json (~15 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "checkpoints/small_moe/final", "The small model.")
flags.DEFINE_list("new_tokens", ["32", "96", "192"], "Generated tokens per measurement.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("num_servers", 4, "Servers of the distributed measurement.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best is reported).")
flags.DEFINE_string("out", "results/bench_kv_cache/cpu.json", "Output JSON.")


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _alternate(slow, fast, repeats: int) -> tuple[float, float]:
  """Best seconds of ``slow`` and of ``fast`` over ``repeats`` alternating runs."""
  t_slow, t_fast = [], []
  for _ in range(repeats):
    for fn, out in ((slow, t_slow), (fast, t_fast)):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return min(t_slow), min(t_fast)


def main(argv):
  del argv
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.num_servers}")
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from moe_edge.config import cluster_config, model_config  # noqa: PLC0415
  from moe_edge.model.checkpoint import restore_checkpoint  # noqa: PLC0415
  from moe_edge.model.decoding import cached_step, generate_cached, sparse_moe_fn  # noqa: PLC0415,E501
  from moe_edge.model.kv_cache import KVCache  # noqa: PLC0415
  from moe_edge.model.transformer import generate  # noqa: PLC0415
  from moe_edge.parallel.mesh import server_mesh  # noqa: PLC0415
  from moe_edge.parallel.runtime import ServingRuntime  # noqa: PLC0415
  from moe_edge.placement import place  # noqa: PLC0415
  from moe_edge.placement.problem import PlacementProblem  # noqa: PLC0415
  from moe_edge.serving.engine import Engine  # noqa: PLC0415
  from moe_edge.serving.scheduler import SchedulerOptions  # noqa: PLC0415
  from moe_edge.workload import corpus  # noqa: PLC0415
  from moe_edge.workload.requests import make_requests  # noqa: PLC0415

  jax.config.update("jax_default_matmul_precision", "highest")  # token equality is meaningful
  model, _, _ = restore_checkpoint(FLAGS.checkpoint, model_config("small_moe"))
  cfg = model.cfg
  text = corpus.load_corpus("heldout")["wikipedia"]
  prompt = np.asarray(text[:FLAGS.prompt_len], np.int32)
  news = [int(v) for v in FLAGS.new_tokens]
  result = dict(model=cfg.name, prompt_len=FLAGS.prompt_len, context=cfg.max_seq_len,
                device=f"{jax.devices()[0].device_kind} ({platform.processor() or 'cpu'})",
                cpu_count=os.cpu_count(), repeats=FLAGS.repeats, single_device={},
                servers=FLAGS.num_servers, runtime={})

  for n in news:  # one device; the two sides alternate, so load changes hit both alike
    p = jnp.asarray(prompt[None])
    uncached = lambda: np.asarray(generate(model, p, n, moe_fn=sparse_moe_fn))  # noqa: E731
    cached = lambda: generate_cached(model, [prompt], n)  # noqa: E731
    same = bool(np.array_equal(uncached()[0, FLAGS.prompt_len:], cached()[0]))  # + compile
    t_u, t_c = _alternate(uncached, cached, FLAGS.repeats)
    result["single_device"][str(n)] = dict(uncached_tokens_per_s=n / t_u,
                                           cached_tokens_per_s=n / t_c, tokens_equal=same)
    print(f"1 device, {n} new tokens: {n / t_u:8.1f} tok/s without cache, {n / t_c:8.1f} with "
          f"(x{t_u / t_c:.1f})", flush=True)

  # Per-token time of the cached decode step at positions 64-95 and 224-255 (one device): two
  # real caches (a 64- and a 224-token prompt) decoded in alternation, 31 steps each, the
  # element-wise minimum over ``repeats`` sweeps (other load only ever adds time).
  step = cached_step(sparse_moe_fn, 0.0)
  key = jax.random.key(0)
  ones = jnp.ones((1,), jnp.int32)
  starts = (FLAGS.prompt_len, cfg.max_seq_len - 32)
  sweeps = {a: [] for a in starts}
  for _ in range(max(FLAGS.repeats, 3)):
    state = {}
    for a in starts:
      cache = KVCache.init(cfg, 1)
      state[a] = step(model, jnp.asarray(np.asarray(text[:a], np.int32)[None]),
                      jnp.asarray([a]), cache, key)
    times = {a: [] for a in starts}
    for _ in range(31):
      for a in starts:
        nxt, cache = state[a]
        t0 = time.perf_counter()
        state[a] = step(model, nxt[:, None], ones, cache, key)
        state[a][0].block_until_ready()
        times[a].append(time.perf_counter() - t0)
    for a in starts:
      sweeps[a].append(times[a])
  early, late = (float(np.median(np.min(np.array(sweeps[a]), axis=0))) for a in starts)
  spans = [f"{a}-{a + 30}" for a in starts]
  result["per_token_ms"] = {spans[0]: 1e3 * early, spans[1]: 1e3 * late}
  result["per_token_growth_64_to_256"] = late / early
  print(f"cached per-token time: {1e3 * early:.2f} ms at positions {spans[0]}, "
        f"{1e3 * late:.2f} ms at {spans[1]} (x{late / early:.2f})", flush=True)

  # The 4-server runtime: cache-free generate vs the engine.
  ns = FLAGS.num_servers
  cluster = cluster_config("homogeneous_4", num_servers=ns)
  l, e, k = cfg.n_moe_layers, cfg.n_experts, cfg.top_k
  problem = PlacementProblem.build(cfg, cluster, np.full((ns, l, e), k / e),
                                   capacity=np.full(ns, (3 * l * e) // (2 * ns)))
  placement = place("dancemoe", problem)
  mesh = server_mesh(ns)
  rt = ServingRuntime(mesh, model, placement, problem=problem)
  prompts = [prompt[None]] * ns
  for n in news:
    requests = make_requests(ns, FLAGS.prompt_len, n, seed=0, requests_per_server=1)
    requests = type(requests)(requests.server, requests.arrival_s, requests.domain,
                              (prompt,) * ns, requests.output_tokens)
    engine = Engine(rt, model, SchedulerOptions(max_batch=1, token_budget=FLAGS.prompt_len,
                                                prefill_chunk=FLAGS.prompt_len,
                                                kv_tokens=cfg.max_seq_len))
    engine.compile()
    uncached = lambda: rt.generate(prompts, n)  # noqa: E731
    served = lambda: engine.serve(requests)  # noqa: E731
    want = np.concatenate(uncached().tokens)[:, FLAGS.prompt_len:]  # compiles
    got = served()
    same = all(np.array_equal(got.tokens[i], want[i]) for i in range(ns))
    t_u, t_c = _best(uncached, 1), _best(served, FLAGS.repeats)  # the slow side timed once
    tokens = ns * n
    result["runtime"][str(n)] = dict(uncached_tokens_per_s=tokens / t_u,
                                     cached_tokens_per_s=tokens / t_c, tokens_equal=same)
    print(f"{ns} servers, {n} new tokens each: {tokens / t_u:8.1f} tok/s without cache, "
          f"{tokens / t_c:8.1f} with (x{t_u / t_c:.1f})", flush=True)

  result["speedup"] = {k: v["cached_tokens_per_s"] / v["uncached_tokens_per_s"]
                       for k, v in result["single_device"].items()}
  result["speedup_4_servers"] = {k: v["cached_tokens_per_s"] / v["uncached_tokens_per_s"]
                                 for k, v in result["runtime"].items()}
  out = Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
