"""Serve the MoE language model on N servers with a placement, and check it against one device.

Each server (one JAX device) gets its own request stream of real held-out text
(:func:`moe_edge.workload.streams.make_streams`: server ``i`` mostly serves domain
``DOMAINS[i % 5]``, share ``--alpha``). The experts are placed by ``--method`` (planned on the
routing the model shows on a separate profiling stream of the same servers) or loaded from
``--placement``; :class:`moe_edge.parallel.runtime.ServingRuntime` then generates
``--max_new_tokens`` greedily for every prompt on its own server, with the MoE layers dispatched
across servers by the placement. ``--migrate_to METHOD`` also replays the generation with a live
migration to that method's placement in the middle (copy after a third of the tokens, swap after
two thirds).

Reported: tokens/s of the distributed runtime and of the single-device model (same process;
on simulated CPU devices these say nothing about real edge hardware), the bytes this cache-free
runtime sent while generating, and for the placement (and, with ``--migrate_to``, for the one
after the migration) a forward pass over the final sequences: local coverage and cross-server
bytes with each token dispatched once (as a KV-cache server would), from the runtime's
``DispatchStats`` next to the cost model's count for the same tokens (they must be equal), and
the largest logit difference to the single-device model (within ``--tol`` of the largest
logit). Generated tokens must equal the single-device model's. Prints PASS or FAIL (exit status
1 on FAIL).

  python experiments/serve.py                                    # trained small_moe, 4 servers
  python experiments/serve.py --migrate_to uniform_ep --requests_per_server 8
  python experiments/serve.py --model_config tiny --checkpoint none --prompt_len 8

On CPU the script gives JAX ``--num_servers`` host devices (``XLA_FLAGS``, set before JAX
starts). Matmuls run at full float32 precision (``jax_default_matmul_precision=highest``) so the
comparison is meaningful on GPUs too.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moe_edge.config import ConfigError, cluster_config, model_config, with_expert_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("model_config", "small_moe", "Model preset (configs/models/).")
flags.DEFINE_string("checkpoint", "checkpoints/small_moe/final",
                    "Checkpoint directory; 'none' = randomly initialised model (--seed).")
flags.DEFINE_string("cluster", "edge_hetero_4", "Cluster preset (configs/clusters/).")
flags.DEFINE_float("copies", 1.5, "Expert memory of the cluster as copies of all experts (the "
                   "small models fit everywhere otherwise); 0 = the cluster's real memory.")
flags.DEFINE_string("method", "dancemoe", "Placement method (moe_edge.placement.METHODS).")
flags.DEFINE_string("placement", None, "Placement .json/.npz to serve with instead of --method.")
flags.DEFINE_string("migrate_to", "", "Also replay the generation with a live migration to this "
                    "method's placement in the middle.")
flags.DEFINE_integer("num_servers", None, "Servers = devices (default: the cluster's size).")
flags.DEFINE_integer("requests_per_server", 4, "Prompts each server generates for.")
flags.DEFINE_integer("prompt_len", 32, "Tokens per prompt.")
flags.DEFINE_integer("max_new_tokens", 16, "Tokens generated per prompt.")
flags.DEFINE_integer("profile_requests", 8, "Requests per server of the profiling stream the "
                     "placement is planned on.")
flags.DEFINE_float("alpha", 0.8, "Share of a server's requests from its home domain.")
flags.DEFINE_enum("transport", "padded", ["padded", "ragged"], "Dispatch transport (ragged: "
                  "GPU/TPU only).")
flags.DEFINE_float("tol", 1e-4, "Largest allowed |logit difference| to the single device, "
                   "relative to the largest |logit| (at least 1).")
flags.DEFINE_integer("seed", 0, "Seed of the streams, the placement and a random-init model.")
flags.DEFINE_string("out", None, "Write the summary as JSON here.")


def _cluster(name: str, num_servers: int | None):
  cluster = cluster_config(name)
  if num_servers is None or num_servers == cluster.num_servers:
    return cluster
  try:
    return cluster_config(name, num_servers=num_servers)
  except TypeError:
    raise app.UsageError(f"cluster {name!r} has {cluster.num_servers} servers and no "
                         f"num_servers option; drop --num_servers or use a cluster with "
                         f"{num_servers} servers (e.g. homogeneous_4).") from None


def _ensure_devices(n: int) -> None:
  """Give the CPU backend ``n`` devices; must run before JAX is imported."""
  if "jax" in sys.modules:
    return
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


def _load_model(cfg, checkpoint: str, seed: int):
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from moe_edge.model.checkpoint import CheckpointError, restore_checkpoint  # noqa: PLC0415
  from moe_edge.model.transformer import MoETransformer  # noqa: PLC0415
  if checkpoint.lower() == "none":  # an "rbg" key: the initialisers compile much faster on CPU
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    return MoETransformer(cfg, rngs), f"random init (seed {seed})"
  path = Path(checkpoint)
  if not path.is_dir():
    raise app.UsageError(f"no checkpoint at {path}; train one with experiments/train_small_moe.py "
                         f"or pass --checkpoint none.")
  try:
    model, _, step = restore_checkpoint(path)  # the checkpoint's own config
  except CheckpointError as e:
    raise app.UsageError(f"cannot restore {path}: {e}") from None
  if model.cfg.name != cfg.name:
    raise app.UsageError(f"{path} holds model {model.cfg.name!r}, not --model_config "
                         f"{cfg.name!r}.")
  return model, f"{path} (step {step})"


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def serve(f) -> dict:
  """Run everything the flags say; return the summary (``summary["pass"]`` is the verdict)."""
  cluster = _cluster(f.cluster, f.num_servers)
  n = cluster.num_servers
  _ensure_devices(n)
  import jax  # noqa: PLC0415  (after the device count is set)
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from moe_edge.cost.model import bytes_matrix, evaluate  # noqa: PLC0415
  from moe_edge.model.transformer import generate  # noqa: PLC0415
  from moe_edge.parallel.mesh import MeshError, server_mesh  # noqa: PLC0415
  from moe_edge.parallel.runtime import ServingRuntime  # noqa: PLC0415
  from moe_edge import migration as mig  # noqa: PLC0415
  from moe_edge.placement import place  # noqa: PLC0415
  from moe_edge.placement.problem import Placement, PlacementProblem  # noqa: PLC0415
  from moe_edge.workload.record import record_trace  # noqa: PLC0415
  from moe_edge.workload.streams import make_streams  # noqa: PLC0415
  from moe_edge.workload.traces import ActivationTrace  # noqa: PLC0415

  jax.config.update("jax_default_matmul_precision", "highest")
  if f.transport == "ragged" and jax.default_backend() == "cpu":
    raise app.UsageError("--transport ragged needs a GPU (ragged_all_to_all is not implemented "
                         "on CPU); use --transport padded.")
  cfg = model_config(f.model_config)
  if f.copies:
    cluster = with_expert_memory(cluster, cfg, f.copies)
  try:
    mesh = server_mesh(n)
  except MeshError as e:
    raise app.UsageError(str(e)) from None
  model, source = _load_model(cfg, f.checkpoint, f.seed)
  cfg = model.cfg
  total = f.prompt_len + f.max_new_tokens
  if total > cfg.max_seq_len:
    raise app.UsageError(f"--prompt_len + --max_new_tokens = {total} exceeds max_seq_len "
                         f"{cfg.max_seq_len} of {cfg.name}.")

  # Placement: planned on the routing of a profiling stream of the same servers.
  profile = make_streams(n, f.profile_requests, total, f.alpha, f.seed + 1)
  trace = record_trace(model, cfg, profile, n, batch_size=4 * n, source="serve profile")
  problem = PlacementProblem.from_trace(trace, cfg, cluster)
  if f.placement:
    placement = Placement.load(f.placement)
    placement.validate(problem)
    method = f"file {f.placement}"
  else:
    placement = place(f.method, problem, seed=f.seed)
    method = f.method
  rt = ServingRuntime(mesh, model, placement, f.transport, problem=problem)

  requests = make_streams(n, f.requests_per_server, f.prompt_len, f.alpha, f.seed)
  prompts = [np.stack([r.tokens for r in requests if r.server == s]) for s in range(n)]
  all_prompts = jnp.asarray(np.concatenate(prompts))

  act = cfg.activation_bytes
  reference = nnx.jit(lambda m, t: m(t)[0])

  def check_forward(tokens: np.ndarray) -> dict:
    """One forward over the final sequences ``[N * R, total]``: logits vs the single device;
    coverage and cross-server bytes (each token dispatched once) vs the cost model."""
    per = [tokens[i * f.requests_per_server:(i + 1) * f.requests_per_server] for i in range(n)]
    step = rt.step(per)
    want = np.asarray(reference(model, jnp.asarray(tokens)))
    ids = np.concatenate([a.reshape(-1, cfg.n_moe_layers, cfg.top_k) for a in step.expert_ids])
    seqs = len(tokens)
    tr = ActivationTrace(
        expert_ids=ids.astype(np.int32), gate_weights=np.ones(ids.shape, np.float32),
        server=np.repeat(np.arange(n), f.requests_per_server * total).astype(np.int32),
        request=np.repeat(np.arange(seqs), total).astype(np.int32),
        position=np.tile(np.arange(total), seqs).astype(np.int32),
        step=np.zeros(len(ids), np.int32), model=cfg.name, num_experts=cfg.n_experts,
        num_servers=n, source="serve final forward")
    cost = evaluate(tr, cfg, cluster, rt.placement, "prefill")
    return dict(
        placement=rt.placement.method, experts_per_server=rt.placement.experts_per_server.tolist(),
        coverage=step.coverage, cost_model_coverage=cost.coverage,
        cross_bytes=2 * int(step.dispatch_bytes(act).sum()),
        cost_model_cross_bytes=2 * int(bytes_matrix(tr, rt.placement, act).sum()),
        max_logit_diff=float(np.max(np.abs(np.concatenate(step.logits) - want))),
        logit_scale=max(1.0, float(np.max(np.abs(want)))))

  # Distributed generation: a warm-up run (compiles) and a timed run.
  rt.generate(prompts, f.max_new_tokens)
  out, dist_s = _timed(lambda: rt.generate(prompts, f.max_new_tokens))
  want = np.asarray(generate(model, all_prompts, f.max_new_tokens))  # also compiles
  _, ref_s = _timed(lambda: np.asarray(generate(model, all_prompts, f.max_new_tokens)))
  got = np.concatenate(out.tokens)
  runs = {"static": got}
  checks = {"static": check_forward(got)}

  migration = None
  if f.migrate_to:
    target = place(f.migrate_to, problem, seed=f.seed)
    third = f.max_new_tokens // 3
    pending = []

    def on_step(t):  # t: the position just written
      if t == f.prompt_len + third - 1:
        pending.append(rt.prepare_placement(target))  # copy; serving goes on from old tables
      elif t == f.prompt_len + 2 * third - 1:
        rt.commit(pending[0].block())  # swap

    moved, seconds = _timed(lambda: rt.generate(prompts, f.max_new_tokens, on_step=on_step))
    report = pending[0].report
    plan = mig.move_cost(placement, target, cfg, cluster, problem.capacity)
    runs["migration"] = np.concatenate(moved.tokens)
    checks["migration"] = check_forward(runs["migration"])
    migration = dict(to=f.migrate_to, copies=report.moves, kept=report.kept,
                     dropped=report.dropped, rounds=report.rounds, link_bytes=report.link_bytes,
                     wire_bytes=report.wire_bytes, planner_copies=plan.moves,
                     planner_link_s=plan.seconds, generate_s=seconds)

  new_tokens = n * f.requests_per_server * f.max_new_tokens
  tokens_equal = {k: bool(np.array_equal(v, want)) for k, v in runs.items()}
  ok = (all(tokens_equal.values())
        and all(c["max_logit_diff"] <= f.tol * c["logit_scale"] for c in checks.values())
        and all(c["cross_bytes"] == c["cost_model_cross_bytes"] for c in checks.values()))
  return dict(
      model=cfg.name, weights=source, cluster=cluster.name, servers=n, method=method,
      transport=f.transport, devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      requests_per_server=f.requests_per_server, prompt_len=f.prompt_len,
      max_new_tokens=f.max_new_tokens, alpha=f.alpha,
      tokens_per_s=new_tokens / dist_s, single_device_tokens_per_s=new_tokens / ref_s,
      generation_cross_bytes=2 * int(out.send_rows.sum()) * act, activation_bytes=act,
      tol=f.tol, tokens_equal=tokens_equal, checks=checks, migration=migration,
      **{"pass": ok})


def format_summary(s: dict) -> str:
  lines = [
      f"model {s['model']} ({s['weights']}) on {s['cluster']}: {s['servers']} servers = "
      f"{s['devices']}, placement {s['method']}, transport {s['transport']}",
      f"{s['requests_per_server']} prompts/server of {s['prompt_len']} tokens, "
      f"{s['max_new_tokens']} new tokens each, alpha {s['alpha']}",
      f"throughput: {s['tokens_per_s']:.1f} tokens/s distributed, "
      f"{s['single_device_tokens_per_s']:.1f} tokens/s on one device "
      f"(ratio {s['tokens_per_s'] / s['single_device_tokens_per_s']:.2f})",
      f"bytes sent during the cache-free generation: {s['generation_cross_bytes']:,} "
      f"({s['activation_bytes']} bytes per activation row)",
  ]
  m = s["migration"]
  if m:
    lines.append(f"live migration to {m['to']}: {m['copies']} expert copies "
                 f"({m['link_bytes']:,} bytes, {m['wire_bytes']:,} on the wire in {m['rounds']} "
                 f"collectives; planner: {m['planner_copies']} copies, "
                 f"{m['planner_link_s'] * 1e3:.2f} ms on the cluster's links), {m['kept']} "
                 f"replicas kept in place, {m['dropped']} dropped")
  for name, c in s["checks"].items():
    same = "=" if c["cross_bytes"] == c["cost_model_cross_bytes"] else "!="
    lines.append(
        f"[{name}] placement {c['placement']}, experts per server {c['experts_per_server']}: "
        f"coverage {c['coverage']:.3f} (cost model {c['cost_model_coverage']:.3f}); cross-server "
        f"bytes of one forward over the final sequences {c['cross_bytes']:,} {same} cost model "
        f"{c['cost_model_cross_bytes']:,}; max |logit diff| {c['max_logit_diff']:.2e} "
        f"(largest |logit| {c['logit_scale']:.1f}, allowed {s['tol']:g} of it)")
  eq = ", ".join(f"{k}: {'equal' if v else 'DIFFERENT'}" for k, v in s["tokens_equal"].items())
  lines.append(f"generated tokens vs single device: {eq}")
  lines.append("PASS" if s["pass"] else "FAIL")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  for name in ("requests_per_server", "prompt_len", "max_new_tokens", "profile_requests"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1.")
  if FLAGS.migrate_to and FLAGS.max_new_tokens < 3:
    raise app.UsageError("--migrate_to needs --max_new_tokens >= 3 (copy after a third of the "
                         "tokens, swap after two thirds).")
  try:
    summary = serve(FLAGS)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  print(format_summary(summary))
  if FLAGS.out:
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(summary, indent=1))
  if not summary["pass"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
