"""Serve a request workload on N servers with a placement: KV-cache decoding, continuous
batching per server, request-level latency.

Every server (one JAX device) gets its own requests (:func:`moe_edge.workload.requests.
make_requests`: Poisson arrivals at ``--rate`` per server, or all at once with ``--rate inf``;
prompts cut from real held-out text of the server's domains, server ``i`` mostly serving
``DOMAINS[i % 5]`` with share ``--alpha``), or the workload saved in ``--requests``. The
experts are placed by ``--method`` (planned on the routing the model shows on a separate
profiling stream) or loaded from ``--placement``. :class:`moe_edge.serving.engine.Engine` then
serves: the pure scheduler forms every server's batch per step (``--max_batch`` slots,
``--token_budget`` tokens per step, prompts in chunks of ``--prefill_chunk``), each server's KV
caches stay on its device, and every MoE layer dispatches across servers by the placement.
``--migrate_to METHOD`` moves the experts to that method's placement live (copy started before
step ``--migrate_at_step``, swapped in two steps later).

Written to ``--out`` (a folder): ``requests.csv``, ``steps.csv``, ``summary.json``
(:mod:`moe_edge.serving.metrics`; plus ``kv_cache``, ``equal_to_single_device`` -- every
generated token equal to the single-device cached model's --, ``bytes_equal_cost_model`` --
every step's dispatch bytes equal to the cost model's for the same routing --, coverage and the
run's settings). Exit status 1 when either check fails.

  python experiments/serve.py --num_servers 4 --requests_per_server 2 --max_new_tokens 32 --out out/serve
  python experiments/serve.py --rate 2 --requests_per_server 8 --migrate_to uniform_ep --out out/serve
  python experiments/serve.py --model_config tiny --checkpoint none --prompt_len 8 --out out/tiny

``--clock wall`` (default) reports measured times on this machine's devices (host CPU devices
say nothing about edge hardware); ``--clock virtual`` advances time by the cost model's step
latency for each step's actual routing on ``--cluster``. On CPU the script gives JAX
``--num_servers`` host devices (``XLA_FLAGS``, set before JAX starts); matmuls run at full
float32 precision so the token equality is meaningful on GPUs too.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_config", "small_moe", "Model preset (configs/models/).")
flags.DEFINE_string("checkpoint", "checkpoints/small_moe/final",
                    "Checkpoint directory; 'none' = randomly initialised model (--seed).")
flags.DEFINE_string("cluster", "edge_hetero_4", "Cluster preset (configs/clusters/).")
flags.DEFINE_float("copies", 1.5, "Expert memory of the cluster as copies of all experts; 0 = "
                   "the cluster's real memory.")
flags.DEFINE_string("method", "dancemoe", "Placement method (moe_edge.placement.METHODS).")
flags.DEFINE_string("placement", None, "Placement .json/.npz to serve with instead of --method.")
flags.DEFINE_string("migrate_to", "", "Migrate live to this method's placement during serving.")
flags.DEFINE_integer("migrate_at_step", 4, "Step before which the migration copy starts.")
flags.DEFINE_integer("num_servers", None, "Servers = devices (default: the cluster's size).")
flags.DEFINE_string("requests", None, "Requests file (.npz/.jsonl) instead of drawing them.")
flags.DEFINE_integer("requests_per_server", 2, "Requests each server receives.")
flags.DEFINE_float("rate", math.inf, "Poisson arrivals per second per server (inf: all at 0).")
flags.DEFINE_string("prompt_len", "32", "Prompt tokens: N, or LO,HI (uniform).")
flags.DEFINE_string("max_new_tokens", "32", "Output tokens: N, or LO,HI (uniform).")
flags.DEFINE_integer("max_batch", 4, "KV-cache slots (running requests) per server.")
flags.DEFINE_integer("token_budget", 128, "Tokens per server per step.")
flags.DEFINE_integer("prefill_chunk", 64, "Prompt positions of one request per step.")
flags.DEFINE_integer("kv_tokens", 0, "KV positions per server for reservations (0: max_batch "
                     "x the model's context).")
flags.DEFINE_enum("policy", "fifo", ["fifo", "shortest_first"], "Admission order.")
flags.DEFINE_enum("clock", "wall", ["wall", "virtual"], "Measured or cost-model step times.")
flags.DEFINE_integer("profile_requests", 8, "Requests per server of the profiling stream the "
                     "placement is planned on.")
flags.DEFINE_float("alpha", 0.8, "Share of a server's requests from its home domain.")
flags.DEFINE_enum("transport", "padded", ["padded", "ragged"], "Dispatch transport (ragged: "
                  "GPU/TPU only).")
flags.DEFINE_integer("seed", 0, "Seed of the workload, the placement and a random-init model.")
flags.DEFINE_string("out", None, "Output folder (requests.csv, steps.csv, summary.json).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def _length(text: str, name: str):
  try:
    parts = [int(v) for v in text.split(",")]
  except ValueError:
    raise app.UsageError(f"--{name} must be N or LO,HI, got {text!r}.") from None
  if len(parts) not in (1, 2) or min(parts) < 1:
    raise app.UsageError(f"--{name} must be N or LO,HI with values >= 1, got {text!r}.")
  return parts[0] if len(parts) == 1 else tuple(parts)


def _ensure_devices(n: int) -> None:
  """Give the CPU backend ``n`` devices; must run before JAX is imported."""
  if "jax" in sys.modules:
    return
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


def _cluster(name: str, num_servers: int | None):
  from moe_edge.config import cluster_config  # noqa: PLC0415
  cluster = cluster_config(name)
  if num_servers is None or num_servers == cluster.num_servers:
    return cluster
  try:
    return cluster_config(name, num_servers=num_servers)
  except TypeError:
    raise app.UsageError(f"cluster {name!r} has {cluster.num_servers} servers and no "
                         f"num_servers option; drop --num_servers or use a cluster with "
                         f"{num_servers} servers (e.g. homogeneous_4).") from None


def _load_model(cfg, checkpoint: str, seed: int):
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from moe_edge.model.checkpoint import CheckpointError, restore_checkpoint  # noqa: PLC0415
  from moe_edge.model.transformer import MoETransformer  # noqa: PLC0415
  if checkpoint.lower() == "none":  # an "rbg" key: the initialisers compile much faster on CPU
    return MoETransformer(cfg, nnx.Rngs(jax.random.key(seed, impl="rbg"))), f"random init ({seed})"
  path = Path(checkpoint)
  if not path.is_dir():
    raise app.UsageError(f"no checkpoint at {path}; train one with experiments/train_small_moe.py "
                         f"or pass --checkpoint none.")
  try:
    model, _, step = restore_checkpoint(path)
  except CheckpointError as e:
    raise app.UsageError(f"cannot restore {path}: {e}") from None
  if model.cfg.name != cfg.name:
    raise app.UsageError(f"{path} holds model {model.cfg.name!r}, not --model_config "
                         f"{cfg.name!r}.")
  return model, f"{path} (step {step})"


def _runtime(f, model, cluster, mesh):
  """The placement (planned on a profiling stream, or loaded), the migration target and the
  :class:`ServingRuntime` holding the placed experts."""
  from moe_edge.parallel.runtime import ServingRuntime  # noqa: PLC0415
  from moe_edge.placement import place  # noqa: PLC0415
  from moe_edge.placement.problem import Placement, PlacementProblem  # noqa: PLC0415
  from moe_edge.workload.record import record_trace  # noqa: PLC0415
  from moe_edge.workload.streams import make_streams  # noqa: PLC0415
  cfg, n = model.cfg, cluster.num_servers
  profile = make_streams(n, f.profile_requests, min(cfg.max_seq_len, 128), f.alpha, f.seed + 1)
  trace = record_trace(model, cfg, profile, n, batch_size=4 * n, source="serve profile")
  problem = PlacementProblem.from_trace(trace, cfg, cluster)
  if f.placement:
    placement = Placement.load(f.placement)
    placement.validate(problem)
    method = f"file {f.placement}"
  else:
    placement = place(f.method, problem, seed=f.seed)
    method = f.method
  target = place(f.migrate_to, problem, seed=f.seed) if f.migrate_to else None
  slots = max(placement.num_slots, target.num_slots if target is not None else 0)
  rt = ServingRuntime(mesh, model, placement, f.transport, problem=problem, num_slots=slots)
  return rt, target, method


def serve(f) -> dict:
  """Run everything the flags say; return the summary."""
  n = _cluster(f.cluster, f.num_servers).num_servers
  _ensure_devices(n)
  import jax  # noqa: PLC0415  (after the device count is set)

  from moe_edge.config import model_config, with_expert_memory  # noqa: PLC0415
  from moe_edge.experiments.progress import Progress  # noqa: PLC0415
  from moe_edge.parallel.mesh import MeshError, server_mesh  # noqa: PLC0415
  from moe_edge.serving import metrics, report  # noqa: PLC0415
  from moe_edge.serving.engine import Engine  # noqa: PLC0415
  from moe_edge.serving.loop import check_requests  # noqa: PLC0415
  from moe_edge.serving.scheduler import SchedulerOptions  # noqa: PLC0415
  from moe_edge.serving.step_cost import StepCost  # noqa: PLC0415
  from moe_edge.workload.requests import Requests, make_requests  # noqa: PLC0415

  jax.config.update("jax_default_matmul_precision", "highest")
  if f.transport == "ragged" and jax.default_backend() == "cpu":
    raise app.UsageError("--transport ragged needs a GPU (ragged_all_to_all is not implemented "
                         "on CPU); use --transport padded.")
  cfg = model_config(f.model_config)
  cluster = _cluster(f.cluster, f.num_servers)
  if f.copies:
    cluster = with_expert_memory(cluster, cfg, f.copies)
  if f.requests:
    requests = Requests.load(f.requests)
  else:
    requests = make_requests(n, _length(f.prompt_len, "prompt_len"),
                             _length(f.max_new_tokens, "max_new_tokens"), f.seed, rate=f.rate,
                             requests_per_server=f.requests_per_server, alpha=f.alpha)
  options = SchedulerOptions(max_batch=f.max_batch, token_budget=f.token_budget,
                             prefill_chunk=f.prefill_chunk,
                             kv_tokens=f.kv_tokens or f.max_batch * cfg.max_seq_len,
                             policy=f.policy)
  check_requests(requests, n, options, cfg.max_seq_len)  # bad input: before any model work
  try:
    mesh = server_mesh(n)
  except MeshError as e:
    raise app.UsageError(str(e)) from None
  model, source = _load_model(cfg, f.checkpoint, f.seed)
  cfg = model.cfg

  rt, target, method = _runtime(f, model, cluster, mesh)
  engine = Engine(rt, model, options, cost=StepCost(cfg, cluster))
  if f.clock == "wall":
    engine.compile()  # measured times without compilation
  placements, migration = [], {}

  def between_steps(step: int, now: float) -> None:
    if target is not None and step == f.migrate_at_step:
      migration["pending"] = rt.prepare_placement(target)
    elif "pending" in migration and step == f.migrate_at_step + 2:
      rep = rt.commit(migration.pop("pending").block())
      migration.update(to=f.migrate_to, at_step=step, copies=rep.moves,
                       link_bytes=rep.link_bytes, wire_bytes=rep.wire_bytes)

  bar = Progress(int(requests.output_tokens.sum()), "tokens", enabled=f.progress)

  def on_step(index: int, produced: int) -> None:
    placements.append(rt.placement)  # the placement that served this step
    bar.update(f"step {index}", produced)

  result = engine.serve(requests, f.clock, between_steps, on_step)
  bar.close()
  want = report.single_device_tokens(model, requests)
  differ = report.tokens_equal(result.tokens, want)
  summary = metrics.summarize(result.loop.requests, result.loop.steps)
  summary.update(
      kv_cache=True, equal_to_single_device=not differ, requests_differing=differ[:10],
      bytes_equal_cost_model=result.dispatch_bytes == result.cost_bytes,
      coverage=report.coverage(result.routing, placements), model=cfg.name, weights=source,
      cluster=cluster.name, servers=n, method=method, clock=f.clock, transport=f.transport,
      devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      scheduler=dict(max_batch=options.max_batch, token_budget=options.token_budget,
                     prefill_chunk=options.prefill_chunk, kv_tokens=options.kv_tokens,
                     policy=options.policy),
      workload=dict(source=f.requests or "make_requests", rate=f.rate, alpha=f.alpha,
                    prompt_len=f.prompt_len, max_new_tokens=f.max_new_tokens, seed=f.seed),
      migration=migration or None)
  if f.out:
    metrics.write_run(f.out, result.loop.requests, result.loop.steps, n, summary)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  for name in ("requests_per_server", "profile_requests", "max_batch", "token_budget",
               "prefill_chunk"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1.")
  from moe_edge.config import ConfigError  # noqa: PLC0415
  from moe_edge.serving.scheduler import SchedulerError  # noqa: PLC0415
  from moe_edge.workload.corpus import CorpusError  # noqa: PLC0415
  try:
    summary = serve(FLAGS)
  except (ConfigError, SchedulerError, CorpusError) as e:
    raise app.UsageError(str(e)) from None
  from moe_edge.serving import report  # noqa: PLC0415
  print(report.format_summary(summary))
  if FLAGS.out:
    print(f"wrote {FLAGS.out}/requests.csv, steps.csv, summary.json")
  if not (summary["equal_to_single_device"] and summary["bytes_equal_cost_model"]):
    print("FAIL")
    sys.exit(1)
  print("PASS")


if __name__ == "__main__":
  app.run(main)
