"""Place experts with every method on one workload and compare them with the cost model.

The workload is a recorded trace (``--trace``, an ActivationTrace ``.npz`` from
``experiments/collect_traces.py``) or a trace sampled from routing statistics (``--stats``: a
shipped name, ``olmoe_1b_7b`` or ``mixtral_8x7b``, or the path of any RoutingStats ``.npz`` of
docs/DESIGN.md: another model, any domains), with locality ``--alpha`` and one home domain per
server (``--home_domains a,b,...`` by name; default: the file's domains round robin). From it
the script builds the :class:`~moe_edge.core.problem.PlacementProblem`, runs each registered
method (``--methods``: names or roles; default every method but the oracles, ``all`` includes
them),
saves every placement as ``<out>/<method>.json`` and prints, per method: local coverage,
cross-server MB per decode step and kB per token, decode latency per token, prefill latency per
request, the mean request latency (``--request_rate`` requests/s per server,
``--output_tokens`` per request; moe_edge/cost/request_latency.py), its gap to the proven lower
bound (and to ``best_known`` when it is named) and the time the method took. As in the tables,
the methods plan on a profiling trace (the first half of the trace's steps) and are costed on a
separate evaluation trace (the second half) by ``moe_edge.cost.evaluate``, regrouped into decode
steps (``--decode_batch`` concurrent requests per server) and prefill batches
(``--prefill_requests`` requests per server per batch); gaps compare the planned values
(moe_edge/experiments/gaps.py). The rows also go to ``<out>/summary.json``. The slow oracles
(``ilp``, ``best_known``) run only when named (``--methods ilp,best_known`` or ``all``). ``--out`` is checked and
claimed before any work (``manifest.json``: command, flags, seed, versions); a rerun with the
same flags replaces its files (and drops the placements of methods it no longer runs), another
run's folder is refused unless ``--overwrite``.

  python experiments/place.py --stats olmoe_1b_7b --alpha 0.8 --cluster edge_hetero_4
  python experiments/place.py --stats mixtral_8x7b --cluster edge_hetero_8 --copies 1.5
  python experiments/place.py --trace traces/small_moe_4srv.npz --model small_moe --methods all
  python experiments/place.py --stats my_stats.npz --model small_moe --home_domains a,b,c,d
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from absl import app, flags

from moe_edge.config import (ClusterConfig, ConfigError, ModelConfig, cluster_config,
                             model_config, with_expert_memory)
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost import Calibration, CostModel
from moe_edge.experiments.costing import cost_methods, phase_traces, workload_summary
from moe_edge.experiments.gaps import setting_gaps
from moe_edge.experiments.workloads import split_trace
from moe_edge.io import OutputFolder, RunIdentity, atomic, cli
from moe_edge.placement import registry
from moe_edge.workload.stats_traces import resolve_stats, sample_stats_trace

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model config name (default: the trace's or --stats model).")
flags.DEFINE_string("cluster", "edge_hetero_4", "Cluster config name (configs/clusters/).")
flags.DEFINE_float("link_gbps", 1.0, "Link bandwidth of the cluster preset, Gbit/s.")
flags.DEFINE_float("copies", None, "Expert memory as copies of all experts (default: the "
                   "cluster's real memory).")
flags.DEFINE_string("trace", None, "ActivationTrace .npz to place for.")
flags.DEFINE_string("stats", None, "Sample a trace from routing statistics instead of --trace: "
                    "a shipped name (olmoe_1b_7b, mixtral_8x7b) or a RoutingStats .npz path.")
flags.DEFINE_list("home_domains", None, "--stats: one home domain per server, by name "
                  "(default: the file's domains round robin).")
flags.DEFINE_float("alpha", 0.8, "--stats: share of a server's requests from its home domain.")
flags.DEFINE_integer("tokens_per_server", 4096, "--stats: tokens in each server's stream.")
flags.DEFINE_string("methods", "", "Comma-separated methods or roles (ours, paper, baseline, "
                    "oracle); empty: all but the oracles; 'all': all.")
flags.DEFINE_string("out", "results/placements", "Folder for the placement JSONs and summary.")
flags.DEFINE_enum("phase", "both", ["both", "decode", "prefill"], "Which latencies to report.")
flags.DEFINE_integer("decode_batch", 8, "Concurrent requests per server in a decode step.")
flags.DEFINE_integer("prefill_requests", 1, "Requests per server in a prefill batch.")
flags.DEFINE_string("calibration", None, "Calibration JSON (default: datasheet roofline).")
flags.DEFINE_integer("seed", 0, "Seed of the sampled trace and of the methods.")
flags.DEFINE_float("request_rate", 0.1, "Requests per second arriving at each server.")
flags.DEFINE_integer("output_tokens", 64, "Output tokens per request.")
flags.DEFINE_bool("overwrite", False, "Replace the results of another run in --out.")
#: The flags that make a run's identity (manifest.json); --out and --overwrite do not.
RUN_FLAGS = ("model", "cluster", "link_gbps", "copies", "trace", "stats", "home_domains",
             "alpha", "tokens_per_server", "methods", "phase", "decode_batch",
             "prefill_requests", "calibration", "seed", "request_rate", "output_tokens")


def method_names(spec: str) -> list[str]:
  """Methods named by ``spec`` (see --methods: names, roles or ``all``), from the registry."""
  known = registry.names()
  if spec.strip() == "all":
    return known
  if not spec.strip():
    return [m for m in known if registry.role(m) != "oracle"]
  names: list[str] = []
  for entry in (m.strip() for m in spec.split(",") if m.strip()):
    if entry in registry.ROLES:
      names += [m for m in registry.names(entry) if m not in names]
    elif entry in known:
      names += [entry] if entry not in names else []
    else:
      raise ConfigError(f"--methods: unknown placement method {entry!r}; known: {', '.join(known)} (or a "
                       f"role: {', '.join(registry.ROLES)}).")
  return names


def load_workload(trace_path: str | None, stats: str | None, model: str | None,
                  cluster: ClusterConfig, tokens_per_server: int, alpha: float,
                  seed: int, home_domains: Sequence[str] | None = None
                  ) -> tuple[ActivationTrace, ModelConfig]:
  """The trace (recorded or sampled for ``cluster``) and the model it belongs to.

  ``stats``: a shipped name or a RoutingStats path; the model is ``model`` (default the
  statistics' name) and must have the statistics' shape. ``home_domains``: one domain of the
  file per server (default round robin over them).
  """
  if (trace_path is None) == (stats is None):
    raise ConfigError("give exactly one of --trace (a recorded .npz) or --stats (a shipped name "
                     "such as olmoe_1b_7b, or a RoutingStats .npz path).")
  if stats is None:
    if home_domains:
      raise ConfigError("--home_domains applies to --stats (a recorded trace has its servers).")
    trace = ActivationTrace.load(trace_path)
    return trace, model_config(model or trace.model)
  st = resolve_stats(stats)
  cfg = model_config(model or st.name)
  if (cfg.n_moe_layers, cfg.n_experts, cfg.top_k) != (st.num_layers, st.num_experts, st.top_k):
    want = (cfg.n_moe_layers, cfg.n_experts, cfg.top_k)
    raise ConfigError(f"model {cfg.name!r} has (L, E, k) = {want} but the statistics "
                     f"{st.name!r} are for {(st.num_layers, st.num_experts, st.top_k)}; give "
                     f"--model with that shape.")
  homes = None
  if home_domains:
    if len(home_domains) != cluster.num_servers:
      raise ConfigError(f"--home_domains names {len(home_domains)} domains for the "
                       f"{cluster.num_servers} servers of {cluster.name}; give one per server "
                       f"(or none for round robin over {', '.join(st.domains)}).")
    homes = [st.domains[st.domain_index(d)] for d in home_domains]
  trace = sample_stats_trace(st, cluster.num_servers, tokens_per_server, alpha, seed, homes)
  return trace, cfg


def run_methods(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
                methods: Sequence[str], out: str | Path | OutputFolder | None,
                phase: str = "both", decode_batch: int = 8, prefill_requests: int = 1,
                seed: int = 0, calibration: Calibration | None = None,
                request_rate: float = 0.1, output_tokens: int = 64) -> list[dict]:
  """Place with each method on the trace's first half, save ``<out>/<method>.json``, and cost
  it on the second half; one row per method.

  Placing and costing is :func:`moe_edge.experiments.costing.cost_methods` (shared with the
  tables), the request latency and gaps :func:`moe_edge.experiments.gaps.setting_gaps`; this
  adds the files (each written atomically; recorded in ``out``'s manifest when it is an
  OutputFolder) and the flat rows printed here.
  """
  profile, evaluation = split_trace(trace)
  requests = dict(request_rate=request_rate, output_tokens=output_tokens)
  problem, results = cost_methods(evaluation, model, cluster, methods, "both", decode_batch,
                                  prefill_requests, seed, calibration, profile=profile,
                                  requests=requests)
  phases = phase_traces(evaluation, "both", decode_batch, prefill_requests)
  gaps = setting_gaps(problem, results, CostModel.build(model, cluster, calibration).hardware,
                      workload_summary(problem, phases, decode_batch, **requests))
  path = (out.path if isinstance(out, OutputFolder) else lambda n: Path(out) / n)
  rows = []
  for res in results:
    if res.placement is None:  # e.g. an instance too large for ilp: report it, go on
      rows.append(dict(method=res.method, error=res.error))
      continue
    row = dict(method=res.method, place_s=res.seconds, **gaps.get(res.method, {}))
    if out is not None:
      row["file"] = str(res.placement.save(path(f"{res.method}.json")))
      if isinstance(out, OutputFolder):
        out.record(f"{res.method}.json")
    for ph, rep in ((p, r) for p, r in res.reports.items() if phase in ("both", p)):
      row.update(coverage=rep.coverage, cross_kb_per_token=rep.cross_bytes_per_token / 1e3,
                 fits=rep.fits)
      row[f"{ph}_ms"] = 1e3 * rep.latency
      row[f"{ph}_cross_mb_per_step"] = rep.cross_bytes_per_step / 1e6
      row[f"{ph}_exchange_ms"] = 1e3 * rep.exchange_time
    rows.append(row)
  if out is not None:
    summary = dict(model=model.name, cluster=cluster.name, tokens=trace.num_tokens,
                   profile_tokens=profile.num_tokens, evaluation_tokens=evaluation.num_tokens,
                   request_rate=request_rate, output_tokens=output_tokens,
                   trace_source=trace.source, decode_batch=decode_batch,
                   prefill_requests=prefill_requests,
                   calibration=calibration.source if calibration else "datasheet", rows=rows)
    if isinstance(out, OutputFolder):
      out.write_json("summary.json", summary)
    else:
      atomic.write_json(path("summary.json"), summary)
  return rows


def format_table(rows: list[dict]) -> str:
  """The summary as an aligned text table."""
  cols = [("method", "method", "{}"), ("coverage", "coverage", "{:.3f}"),
          ("decode_cross_mb_per_step", "MB/step", "{:.3f}"),
          ("cross_kb_per_token", "kB/token", "{:.1f}"),
          ("decode_ms", "decode ms/tok", "{:.2f}"), ("prefill_ms", "prefill ms/req", "{:.1f}"),
          ("request_ms", "request ms", "{:.1f}"),
          ("gap_to_best_known", "vs best_known", "{:+.2%}"),
          ("gap_to_bound", "vs lower bound", "{:+.2%}"),
          ("place_s", "place s", "{:.2f}"), ("fits", "fits", "{}")]
  cols = [c for c in cols if any(c[0] in r for r in rows)]
  lower = next((r["bound_request_ms"] for r in rows if "bound_request_ms" in r), None)
  cells = [[c[1] for c in cols]] + [[c[2].format(r[c[0]]) if c[0] in r else "-" for c in cols]
                                    for r in rows]
  width = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ["  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(row, width)))
           for row in cells]
  foot = [] if lower is None else [f"lower bound of the planned request latency: {lower:.1f} ms"]
  return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:] + foot)


def check_flags() -> None:
  """Raise app.UsageError naming the first flag whose value cannot make a run."""
  cli.check_flags(FLAGS, at_least_1=("tokens_per_server", "decode_batch", "prefill_requests",
                              "output_tokens"),
                  at_least_0=("seed",),
                  ranges={"link_gbps": (0.0, math.inf, True),
                          "request_rate": (0.0, math.inf, True), "alpha": (0.0, 1.0, False),
                          "copies": (1.0, math.inf, False)})
  if (FLAGS.trace is None) == (FLAGS.stats is None):
    raise app.UsageError("give exactly one of --trace (a recorded .npz) or --stats (a shipped "
                         "name such as olmoe_1b_7b, or a RoutingStats .npz path).")
  if FLAGS.trace is not None and FLAGS.home_domains:
    raise app.UsageError("--home_domains applies to --stats (a recorded trace has its "
                         "servers).")


def claim(methods: Sequence[str]) -> OutputFolder:
  """``--out`` claimed for this run before any work (manifest.json: the flags, the methods)."""
  config = {name: FLAGS[name].value for name in RUN_FLAGS}
  config.update(methods=list(methods))
  return OutputFolder.claim(
      FLAGS.out, RunIdentity("place", config, FLAGS.seed),
      [f"{m}.json" for m in methods] + ["summary.json"], overwrite=FLAGS.overwrite,
      refuse_hint="choose another --out, or pass --overwrite to replace them")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  check_flags()
  cluster = cluster_config(FLAGS.cluster, link_gbps=FLAGS.link_gbps)
  methods = method_names(FLAGS.methods)
  if FLAGS.home_domains and len(FLAGS.home_domains) != cluster.num_servers:
    raise app.UsageError(f"--home_domains names {len(FLAGS.home_domains)} domains for the "
                         f"{cluster.num_servers} servers of {cluster.name}; give one per "
                         f"server (or none for round robin over the statistics' domains).")
  calibration = Calibration.load(FLAGS.calibration) if FLAGS.calibration else None
  out = claim(methods)
  trace, model = load_workload(FLAGS.trace, FLAGS.stats, FLAGS.model, cluster,
                               FLAGS.tokens_per_server, FLAGS.alpha, FLAGS.seed,
                               FLAGS.home_domains)
  if FLAGS.copies is not None:
    cluster = with_expert_memory(cluster, model, FLAGS.copies)
  trace.check_matches(model.n_moe_layers, model.n_experts, model.top_k, cluster.num_servers)
  print(f"model {model.name} (L={model.n_moe_layers}, E={model.n_experts}, k={model.top_k}) on "
        f"{cluster.name} (N={cluster.num_servers}, expert capacity "
        f"{cluster.expert_capacity(model).tolist()} of {model.n_moe_layers * model.n_experts})")
  print(f"trace: {trace.num_tokens:,} tokens ({trace.source or FLAGS.trace}); decode "
        f"{FLAGS.decode_batch} requests/server/step, prefill {FLAGS.prefill_requests} "
        f"request(s)/server/batch; calibration: "
        f"{calibration.source if calibration else 'datasheet'}")
  rows = run_methods(trace, model, cluster, methods, out, FLAGS.phase, FLAGS.decode_batch,
                     FLAGS.prefill_requests, FLAGS.seed, calibration, FLAGS.request_rate,
                     FLAGS.output_tokens)
  out.finish()
  print(format_table([r for r in rows if "error" not in r]))
  for r in rows:
    if "error" in r:
      print(f"{r['method']}: not run: {r['error']}")
  print(f"placements and summary.json in {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
