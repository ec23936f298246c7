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
  continuous batching, per-server KV caches), both after compilation.

Tokens/s = new tokens / wall time of the whole generation (prompt included, compilation
excluded; best of ``--repeats``). ``speedup[n]`` = cached / cache-free tokens/s on one device,
``speedup_4_servers[n]`` on the runtime. Also the cached per-token time at positions 64-95 and
224-255 (one device), whose ratio is the growth of the per-token time with the context.
Same process, same devices for every pair. Writes ``--out`` (JSON).

  .venv/bin/python benchmarks/bench_kv_cache.py            # -> results/bench_kv_cache/cpu.json
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

  for n in news:  # one device
    p = jnp.asarray(prompt[None])
    uncached = lambda: np.asarray(generate(model, p, n, moe_fn=sparse_moe_fn))  # noqa: E731
    cached = lambda: generate_cached(model, [prompt], n)  # noqa: E731
    same = bool(np.array_equal(uncached()[0, FLAGS.prompt_len:], cached()[0]))  # + compile
    t_u, t_c = _best(uncached, FLAGS.repeats), _best(cached, FLAGS.repeats)
    result["single_device"][str(n)] = dict(uncached_tokens_per_s=n / t_u,
                                           cached_tokens_per_s=n / t_c, tokens_equal=same)
    print(f"1 device, {n} new tokens: {n / t_u:8.1f} tok/s without cache, {n / t_c:8.1f} with "
          f"(x{t_u / t_c:.1f})", flush=True)

  # Per-token time of the cached decode step at growing positions (one device): the
  # element-wise minimum over ``repeats`` sweeps from position 64 to 255 (other load on the
  # machine only ever adds time).
  step = cached_step(sparse_moe_fn, 0.0)
  key = jax.random.key(0)
  ones = jnp.ones((1,), jnp.int32)
  sweeps = []
  for _ in range(max(FLAGS.repeats, 3)):
    cache = KVCache.init(cfg, 1)
    nxt, cache = step(model, jnp.asarray(prompt[None]), jnp.asarray([FLAGS.prompt_len]), cache,
                      key)
    per_pos = []
    for _ in range(FLAGS.prompt_len, cfg.max_seq_len - 1):
      t0 = time.perf_counter()
      nxt, cache = step(model, nxt[:, None], ones, cache, key)
      nxt.block_until_ready()
      per_pos.append(time.perf_counter() - t0)
    sweeps.append(per_pos)
  per_pos = np.min(np.array(sweeps), axis=0)  # [positions 65 .. 255]
  early, late = float(np.median(per_pos[:31])), float(np.median(per_pos[-31:]))
  result["per_token_ms"] = {"64-95": 1e3 * early, "224-255": 1e3 * late}
  result["per_token_growth_64_to_256"] = late / early
  print(f"cached per-token time: {1e3 * early:.2f} ms at positions 64-95, {1e3 * late:.2f} ms "
        f"at 224-255 (x{late / early:.2f})", flush=True)

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
    uncached()
    got = served()
    want = np.concatenate(uncached().tokens)[:, FLAGS.prompt_len:]
    same = all(np.array_equal(got.tokens[i], want[i]) for i in range(ns))
    t_u, t_c = _best(uncached, FLAGS.repeats), _best(served, FLAGS.repeats)
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
