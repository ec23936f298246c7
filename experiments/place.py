"""Place experts with every method on one workload and compare them with the cost model.

The workload is a recorded trace (``--trace``, an ActivationTrace ``.npz`` from
``experiments/collect_traces.py``) or a trace sampled from the real routing statistics of
OLMoE-1B-7B / Mixtral-8x7B (``--stats``, with locality ``--alpha``). From it the script builds
the :class:`~moe_edge.placement.problem.PlacementProblem`, runs each method of
``moe_edge.placement.METHODS`` (``--methods``; default all but ``ilp``, ``all`` includes it),
saves every placement as ``<out>/<method>.json`` and prints, per method: local coverage,
cross-server MB per decode step and kB per token, decode latency per token, prefill latency per
request and the time the method took. Latencies come from ``moe_edge.cost.evaluate`` on the
same trace regrouped into decode steps (``--decode_batch`` concurrent requests per server) and
prefill batches (``--prefill_requests`` requests per server per batch). The rows also go to
``<out>/summary.json``.

  python experiments/place.py --stats olmoe_1b_7b --alpha 0.8 --cluster edge_hetero_4
  python experiments/place.py --stats mixtral_8x7b --cluster edge_hetero_8 --copies 1.5
  python experiments/place.py --trace traces/small_moe_4srv.npz --model small_moe --methods all
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from absl import app, flags

from moe_edge.config import (ClusterConfig, ModelConfig, cluster_config, model_config,
                             with_expert_memory)
from moe_edge.cost import Calibration
from moe_edge.placement import registry
from moe_edge.workload.traces import ActivationTrace

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model config name (default: the trace's or --stats model).")
flags.DEFINE_string("cluster", "edge_hetero_4", "Cluster config name (configs/clusters/).")
flags.DEFINE_float("link_gbps", 1.0, "Link bandwidth of the cluster preset, Gbit/s.")
flags.DEFINE_float("copies", None, "Expert memory as copies of all experts (default: the "
                   "cluster's real memory).")
flags.DEFINE_string("trace", None, "ActivationTrace .npz to place for.")
flags.DEFINE_enum("stats", None, ["olmoe_1b_7b", "mixtral_8x7b"],
                  "Sample a trace from these real routing statistics instead of --trace.")
flags.DEFINE_float("alpha", 0.8, "--stats: share of a server's requests from its home domain.")
flags.DEFINE_integer("tokens_per_server", 4096, "--stats: tokens in each server's stream.")
flags.DEFINE_string("methods", "", "Comma-separated methods; empty: all but ilp; 'all': all.")
flags.DEFINE_string("out", "results/placements", "Folder for the placement JSONs and summary.")
flags.DEFINE_enum("phase", "both", ["both", "decode", "prefill"], "Which latencies to report.")
flags.DEFINE_integer("decode_batch", 8, "Concurrent requests per server in a decode step.")
flags.DEFINE_integer("prefill_requests", 1, "Requests per server in a prefill batch.")
flags.DEFINE_string("calibration", None, "Calibration JSON (default: datasheet roofline).")
flags.DEFINE_integer("seed", 0, "Seed of the sampled trace and of the methods.")


def method_names(spec: str) -> list[str]:
  """Methods named by ``spec`` (see --methods), checked against the registry."""
  known = registry.names()
  if spec.strip() == "all":
    return known
  if not spec.strip():
    return [m for m in known if registry.role(m) != "oracle"]
  names = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in names if m not in known]
  if unknown:
    raise ValueError(f"unknown placement method(s) {unknown}; known: {', '.join(known)}.")
  return names


def load_workload(trace_path: str | None, stats: str | None, model: str | None,
                  cluster: ClusterConfig, tokens_per_server: int, alpha: float,
                  seed: int) -> tuple[ActivationTrace, ModelConfig]:
  """The trace (recorded or sampled for ``cluster``) and the model it belongs to."""
  if (trace_path is None) == (stats is None):
    raise ValueError("give exactly one of --trace (a recorded .npz) or --stats (olmoe_1b_7b or "
                     "mixtral_8x7b).")
  if stats is not None:
    from moe_edge.workload.stats_traces import sample_stats_trace  # noqa: PLC0415
    if model is not None and model != stats:
      raise ValueError(f"--model {model} differs from --stats {stats}; a statistics-driven "
                       f"trace is at the shape of its own model (drop --model).")
    trace = sample_stats_trace(stats, cluster.num_servers, tokens_per_server, alpha, seed)
    return trace, model_config(stats)
  trace = ActivationTrace.load(trace_path)
  return trace, model_config(model or trace.model)


def run_methods(trace: ActivationTrace, model: ModelConfig, cluster: ClusterConfig,
                methods: Sequence[str], out: str | Path | None, phase: str = "both",
                decode_batch: int = 8, prefill_requests: int = 1, seed: int = 0,
                calibration: Calibration | None = None) -> list[dict]:
  """Place with each method, save ``<out>/<method>.json``, and cost it; one row per method.

  Placing and costing is :func:`moe_edge.experiments.tables.cost_methods` (shared with the
  tables); this adds the files and the flat rows printed here.
  """
  from moe_edge.experiments.tables import cost_methods  # noqa: PLC0415
  _, results = cost_methods(trace, model, cluster, methods, phase, decode_batch,
                            prefill_requests, seed, calibration)
  rows = []
  for res in results:
    if res.placement is None:  # e.g. an instance too large for ilp: report it, go on
      rows.append(dict(method=res.method, error=res.error))
      continue
    row = dict(method=res.method, place_s=res.seconds)
    if out is not None:
      row["file"] = str(res.placement.save(Path(out) / f"{res.method}.json"))
    for ph, rep in res.reports.items():
      row.update(coverage=rep.coverage, cross_kb_per_token=rep.cross_bytes_per_token / 1e3,
                 fits=rep.fits)
      row[f"{ph}_ms"] = 1e3 * rep.latency
      row[f"{ph}_cross_mb_per_step"] = rep.cross_bytes_per_step / 1e6
      row[f"{ph}_exchange_ms"] = 1e3 * rep.exchange_time
    rows.append(row)
  if out is not None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(dict(
        model=model.name, cluster=cluster.name, tokens=trace.num_tokens,
        trace_source=trace.source, decode_batch=decode_batch, prefill_requests=prefill_requests,
        calibration=calibration.source if calibration else "datasheet", rows=rows), indent=1))
  return rows


def format_table(rows: list[dict]) -> str:
  """The summary as an aligned text table."""
  cols = [("method", "method", "{}"), ("coverage", "coverage", "{:.3f}"),
          ("decode_cross_mb_per_step", "MB/step", "{:.3f}"),
          ("cross_kb_per_token", "kB/token", "{:.1f}"),
          ("decode_ms", "decode ms/tok", "{:.2f}"), ("prefill_ms", "prefill ms/req", "{:.1f}"),
          ("place_s", "place s", "{:.2f}"), ("fits", "fits", "{}")]
  cols = [c for c in cols if any(c[0] in r for r in rows)]
  cells = [[c[1] for c in cols]] + [[c[2].format(r[c[0]]) if c[0] in r else "-" for c in cols]
                                    for r in rows]
  width = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ["  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(row, width)))
           for row in cells]
  return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cluster = cluster_config(FLAGS.cluster, link_gbps=FLAGS.link_gbps)
  try:
    trace, model = load_workload(FLAGS.trace, FLAGS.stats, FLAGS.model, cluster,
                                 FLAGS.tokens_per_server, FLAGS.alpha, FLAGS.seed)
    methods = method_names(FLAGS.methods)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.copies is not None:
    cluster = with_expert_memory(cluster, model, FLAGS.copies)
  calibration = Calibration.load(FLAGS.calibration) if FLAGS.calibration else None
  print(f"model {model.name} (L={model.n_moe_layers}, E={model.n_experts}, k={model.top_k}) on "
        f"{cluster.name} (N={cluster.num_servers}, expert capacity "
        f"{cluster.expert_capacity(model).tolist()} of {model.n_moe_layers * model.n_experts})")
  print(f"trace: {trace.num_tokens:,} tokens ({trace.source or FLAGS.trace}); decode "
        f"{FLAGS.decode_batch} requests/server/step, prefill {FLAGS.prefill_requests} "
        f"request(s)/server/batch; calibration: "
        f"{calibration.source if calibration else 'datasheet'}")
  rows = run_methods(trace, model, cluster, methods, FLAGS.out, FLAGS.phase, FLAGS.decode_batch,
                     FLAGS.prefill_requests, FLAGS.seed, calibration)
  print(format_table([r for r in rows if "error" not in r]))
  for r in rows:
    if "error" in r:
      print(f"{r['method']}: not run: {r['error']}")
  print(f"placements and summary.json in {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
