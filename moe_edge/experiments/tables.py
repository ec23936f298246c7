"""The paper's tables: every placement method on every model and cluster, costed by one model.

Run (:func:`compute_rows`): for each model and cluster, the model's workload
(:mod:`~moe_edge.experiments.workloads`: a profiling and an evaluation trace), the cluster at
``copies`` expert memory, every method planned on the profiling trace
(:func:`cost_methods`, also what ``experiments/place.py`` runs) and costed on the evaluation
trace by :func:`moe_edge.cost.evaluate`: decode latency per token (``decode_batch`` concurrent
requests per server, latency = mean step time), prefill latency per request (one request per
server per step), cross-server bytes per token and local coverage; plus the placement objective
``J`` (``objective.py``, on the profiling problem) and, where the ILP solves, every method's gap
to the optimal ``J``.

Compose (:func:`~moe_edge.experiments.headline.headline`): the latency and communication
reduction of each method of role ``ours`` against each method of role ``baseline`` and the best
baseline of each setting, and its gap to the oracle (the ILP). Which methods exist and their
roles come from the placement registry: a registered method appears here with no other edit.

Format (:func:`format_markdown`, :func:`write_tables`): ``tables.csv``, ``tables.md``, plots.
The CSV holds no wall-clock times, so two runs with one seed write identical files
(placement times go to ``timings.json``).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Sequence


from moe_edge.config import ClusterConfig, ConfigError, GB, ModelConfig, cluster_config
from moe_edge.config import model_config, with_expert_memory
from moe_edge.core.problem import Placement
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost import Calibration, CostModel
from moe_edge.experiments import calibration as calib
from moe_edge.experiments import extension_rows as ext
from moe_edge.experiments.config import ExperimentConfig, load_experiment, with_overrides
from moe_edge.experiments.costing import (MethodResult, cost_methods, cost_placement,  # noqa: F401
                                          phase_traces, report_metrics, workload_summary)
from moe_edge.experiments.gaps import (GAP_COLUMNS, format_gap_table, format_goal_table,
                                      format_goals, setting_gaps)
from moe_edge.experiments.headline import (display_name, format_headline, headline,  # noqa: F401
                                           ok_rows, ours_present, pct, settings)
from moe_edge.experiments.plots import plot_tables
from moe_edge.experiments.progress import Progress
from moe_edge.experiments.request_rows import REQUEST_COLUMNS, request_metrics
from moe_edge.experiments.workloads import (build_workload, served_model, small_trace,
                                            split_trace, workload_kind)
from moe_edge.io import atomic
from moe_edge.placement import registry
from moe_edge.placement.objective import objective
COLUMNS = ("model", "cluster", "servers", "copies", "bytes_per_param", "method", "status",
           "decode_ms", "prefill_ms", "cross_kb_per_token", "coverage", "decode_exchange_ms",
           "decode_compute_ms", "decode_dense_ms", "prefill_exchange_ms", "prefill_compute_ms",
           "decode_cross_mb_per_step", "decode_ms_datasheet", "prefill_ms_datasheet",
           "objective", "gap_to_ilp", "ilp_status", "ilp_proven_gap", "replicas_per_expert",
           "fits", "calibration", "workload", "delta_nll", "extension") + GAP_COLUMNS
ILP_MAX_SIZE = 8192  # N*L*E the tables give the ILP: OLMoE on 8 servers solves in ~11 s
# best_known in the tables: the long search continued from latency_search's result, from the LP's
# start where the config runs the LP bound (bound_lp_max_cells) and from the
# best start only (its default also restarts from every other start method, ~5x the time; on
# the development settings the continuation always won)
BEST_KNOWN_OPTIONS = dict(restarts=0)


# --------------------------------------------------------------------------------------------
# Placing and costing (shared with experiments/place.py)
# --------------------------------------------------------------------------------------------
def _is_oracle(method: str) -> bool:
  return method in registry.names("oracle")


def _requests(cfg: ExperimentConfig) -> dict:
  """The request workload every method plans for (``costing.workload_summary``): the config's
  ``request_rate`` requests/s per server, prompts of the trace's requests, outputs of
  ``request_output_tokens``."""
  return dict(request_rate=cfg.request_rate, output_tokens=cfg.request_output_tokens)


# --------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------
def setting_cluster(cfg: ExperimentConfig, cluster_name: str, model: ModelConfig) -> ClusterConfig:
  """The cluster preset at ``cfg.link_gbps`` with ``cfg.copies`` copies of expert memory."""
  return with_expert_memory(cluster_config(cluster_name, link_gbps=cfg.link_gbps), model,
                            cfg.copies)


def _small_traces(cfg: ExperimentConfig, num_servers: int, given: dict | None):
  if given and num_servers in given:
    return given[num_servers]
  return (small_trace(cfg, num_servers, cfg.seed + cfg.profile_seed_offset),
          small_trace(cfg, num_servers, cfg.seed))


def compute_rows(cfg: ExperimentConfig, small: dict | None = None,
                 progress: Progress | None = None,
                 small_note: str | None = None) -> tuple[list[dict], dict]:
  """All table rows of ``cfg`` (one per model x cluster x method) and the wall times.

  Args:
    small: ``{num_servers: (profile, trace)}`` small-model traces to use instead of recording
      or loading them (the demo passes the trace it recorded).
    small_note: caption of the small model's workload when ``small`` is given.
    progress: advanced once per workload and once per method.
  Returns:
    ``(rows, timings)``: rows with the keys of :data:`COLUMNS`; timings
    ``{"model/cluster/method": seconds}`` of the placement methods.
  """
  rows, timings = [], {}
  cache: dict[int, tuple] = {}
  options = {"ilp": dict(time_limit=cfg.ilp_time_limit, max_size=ILP_MAX_SIZE),
             "best_known": dict(BEST_KNOWN_OPTIONS, lp_start_max_cells=cfg.bound_lp_max_cells)}
  for model_name in cfg.models:
    for cluster_name in cfg.clusters:
      base = cluster_config(cluster_name, link_gbps=cfg.link_gbps)
      n = base.num_servers
      small_pair = None
      if workload_kind(model_name) in ("recorded", "mapped"):
        if n not in cache:
          cache[n] = _small_traces(cfg, n, small)
        small_pair = cache[n]
      work = build_workload(cfg, model_name, n, small_pair,
                            small_note if small and n in small else None)
      cluster = with_expert_memory(base, work.model, cfg.copies)
      cal = calib.edge_calibration(cfg.calibration, cluster, model_name)
      if progress is not None:
        progress.update(f"{model_name} on {cluster_name}: workload ready")
      tick = lambda m: progress.update(f"{model_name} on {cluster_name}: {m}") if (  # noqa
          progress is not None) else None
      problem, results = cost_methods(work.trace, work.model, cluster, cfg.methods,
                                      decode_batch=cfg.decode_batch,
                                      prefill_requests=cfg.prefill_requests, seed=cfg.seed,
                                      calibration=cal, profile=work.profile, options=options,
                                      on_method=tick, requests=_requests(cfg))
      phases = phase_traces(work.trace, "both", cfg.decode_batch, cfg.prefill_requests)
      ds = Calibration.datasheet(cluster)
      bound_time: dict = {}
      gaps = setting_gaps(problem, results, CostModel.build(work.model, cluster, cal).hardware,
                          workload_summary(problem, phases, cfg.decode_batch, **_requests(cfg)),
                          timings=bound_time, lp_max_cells=cfg.bound_lp_max_cells)
      if "lower_bound" in bound_time:
        timings[f"{model_name}/{cluster_name}/lower_bound"] = bound_time["lower_bound"]
      opt = next((r for r in results if r.method == "ilp" and r.placement is not None), None)
      j_opt = objective(problem, opt.placement) if opt is not None else None
      l, e = work.model.n_moe_layers, work.model.n_experts
      for r in results:
        row = dict(model=model_name, cluster=cluster_name, servers=n, copies=cfg.copies,
                   bytes_per_param=work.model.bytes_per_param, method=r.method,
                   calibration=cfg.calibration, workload=work.note)
        timings[f"{model_name}/{cluster_name}/{r.method}"] = r.seconds
        if r.placement is None:
          row["status"] = "not run: " + r.error.split(";")[0]
          rows.append(row)
          continue
        row["status"] = "ok"
        row.update(report_metrics(r.reports))
        if cfg.calibration == "datasheet":
          alt = r.reports
        else:
          alt = cost_placement(r.placement, phases, work.model, cluster, ds)
        row["decode_ms_datasheet"] = 1e3 * alt["decode"].latency
        row["prefill_ms_datasheet"] = 1e3 * alt["prefill"].latency
        j = objective(problem, r.placement)
        row["objective"] = j
        if j_opt is not None:
          row["gap_to_ilp"] = j / j_opt - 1.0
        row.update(gaps.get(r.method, {}))
        if r.method == "ilp":
          row["ilp_status"] = r.placement.info.get("status", "")
          row["ilp_proven_gap"] = r.placement.info.get("gap", float("nan"))
        row["replicas_per_expert"] = float(r.placement.hosts.sum()) / (l * e)
        if work.kind in ("stats", "standin"):  # request columns need routing statistics
          row.update(request_metrics(cfg, model_name, work.model, cluster, cal, r.placement))
        rows.append(row)
      dm = next((r for r in results if r.method == "dancemoe" and r.placement is not None),
                None)
      if cfg.extension_rows and dm is not None:
        rows += _extension_rows(cfg, model_name, work, cluster, cal, ds, dm.placement,
                                next(x for x in rows if x["model"] == model_name and
                                     x["cluster"] == cluster_name and x["method"] == "dancemoe"))
        if progress is not None:
          progress.note(f"{model_name} on {cluster_name}: extension rows")
  return rows, timings


def _extension_rows(cfg: ExperimentConfig, model_name: str, work, cluster: ClusterConfig,
                    cal: Calibration | None, ds: Calibration, placement: Placement,
                    base_row: dict) -> list[dict]:
  """The extensions' rows of one setting (``extension_rows.py``), costed like the others."""
  def cost(trace: ActivationTrace) -> dict:
    phases = phase_traces(trace, "both", cfg.decode_batch, cfg.prefill_requests)
    out = report_metrics(cost_placement(placement, phases, work.model, cluster, cal))
    alt = cost_placement(placement, phases, work.model, cluster, ds)
    out["decode_ms_datasheet"] = 1e3 * alt["decode"].latency
    out["prefill_ms_datasheet"] = 1e3 * alt["prefill"].latency
    return out

  return ext.extension_rows(cfg, model_name, work.model, cluster, work.trace, placement,
                            base_row, cost, with_weights=work.kind == "recorded",
                            calibration=cal)


# --------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
    return "-"
  return format(v, spec)


def memory_lines(cfg: ExperimentConfig) -> list[str]:
  """What the memory budget means per model and cluster, and why a weight format was changed."""
  lines = []
  for name in cfg.models:
    model = served_model(cfg, name)
    total = model.n_moe_layers * model.n_experts * model.expert_bytes
    parts = []
    for cl in cfg.clusters:
      base = cluster_config(cl, link_gbps=cfg.link_gbps)
      try:
        real = base.expert_memory(model).sum() / total
        parts.append(f"{cl}: {cfg.copies:g} copies used, its real memory would hold "
                     f"{real:.1f}")
      except ConfigError:
        parts.append(f"{cl}: dense weights do not fit its real memory")
    b = cfg.served_bytes_per_param(name)
    why = ""
    if b is not None:
      native = model_config(name)
      need = native.n_moe_layers * native.n_experts * native.expert_bytes
      have = []
      for cl in cfg.clusters:
        try:
          have.append(f"{cl} has {cluster_config(cl).expert_memory(native).sum() / GB:.1f} GB")
        except ConfigError:
          have.append(f"{cl} cannot even hold its dense weights")
      why = (f" Served with {b:g} bytes/param ({'4-bit' if b == 0.5 else f'{8 * b:g}-bit'} "
             f"weights): at {native.bytes_per_param:g} bytes/param its experts need "
             f"{need / GB:.1f} GB while after the dense weights {', '.join(have)}.")
    lines.append(f"- {name}: {model.n_moe_layers} x {model.n_experts} experts of "
                 f"{model.expert_bytes / 1e6:.2f} MB ({total / GB:.2f} GB per copy); "
                 f"{'; '.join(parts)}.{why}")
  return lines


def format_model_table(rows: Sequence[dict], model: str) -> str:
  """Markdown table of one model: every cluster and method; the best value per cluster bold."""
  mine = [r for r in rows if r["model"] == model]
  loss = any(r.get("extension") for r in mine)
  req = any("request_latency_s" in r for r in mine)  # request-level columns (request_rows.py)
  head = ("| cluster | method | decode ms/token | prefill ms/request | cross kB/token | "
          "local coverage | replicas/expert | objective J | J vs ILP | " +
          ("delta NLL (nats/byte) | " if loss else "") +
          ("request latency s | TTFT s | " if req else "") + "status |")
  lines = [head, "|" + "---|" * (10 + loss + 2 * req)]
  for cluster in dict.fromkeys(r["cluster"] for r in mine):
    here = [r for r in mine if r["cluster"] == cluster]
    ok = [r for r in ok_rows(here) if not r.get("extension")]  # bold: best placement method
    best = {k: min(r[k] for r in ok) for k in ("decode_ms", "prefill_ms", "cross_kb_per_token")
            } if ok else {}
    for r in here:
      def cell(k, spec):
        s = _fmt(r.get(k), spec)
        return f"**{s}**" if k in best and r.get(k) == best[k] else s
      rq = (f"{_fmt(r.get('request_latency_s'), '.2f')} | "
            f"{_fmt(r.get('request_ttft_s'), '.2f')} | ") if req else ""
      if r["status"] != "ok":
        lines.append(f"| {cluster} | {r['method']} | - | - | - | - | - | - | - | "
                     + ("- | " if loss else "") + ("- | - | " if req else "") +
                     f"{r['status']} |")
        continue
      gap = r.get("gap_to_ilp")
      dn = r.get("delta_nll")
      dn = ((f"{dn:+.4f}" if isinstance(dn, float) else str(dn)) if r.get("extension") else
            "-") + " | " if loss else ""
      lines.append(
          f"| {cluster} | {r['method']} | {cell('decode_ms', '.2f')} | "
          f"{cell('prefill_ms', '.1f')} | {cell('cross_kb_per_token', '.1f')} | "
          f"{_fmt(r.get('coverage'), '.3f')} | {_fmt(r.get('replicas_per_expert'), '.2f')} | "
          f"{_fmt(r.get('objective'), '.4g')} | {'-' if gap is None else pct(gap)} | {dn}{rq}"
          f"{r.get('ilp_status', 'ok') if _is_oracle(r['method']) else r['status']} |")
  return "\n".join(lines)


def format_crosscheck(rows: Sequence[dict]) -> str:
  """Markdown table of the cost-model cross-check (``crosscheck.py``)."""
  if not rows:
    return ""
  lines = ["| placement | local coverage | measured ms/step | measured, all tokens masked | "
           "predicted ms/step | measured / predicted | predicted, servers serialised | "
           "measured / serialised | bytes equal |", "|" + "---|" * 9]
  for r in rows:
    lines.append(f"| {r['method']} | {r['coverage']:.3f} | {r['measured_ms']:.2f} | "
                 f"{r['measured_masked_ms']:.2f} | {r['predicted_ms']:.3f} | {r['ratio']:.2f} | "
                 f"{r['predicted_serial_ms']:.3f} | {r['ratio_serial']:.2f} | "
                 f"{'yes' if r['bytes_equal'] else 'NO'} |")
  return "\n".join(lines)


def extension_note(cfg: ExperimentConfig) -> str:
  """What the extension rows are (``extension_rows.py``)."""
  tau, b = cfg.substitution_threshold, cfg.budget_remote_choices
  return (f"`dancemoe+subst({tau:g})`: a remote token-choice with gate < {tau:g} is replaced by "
          f"the most similar locally hosted expert (routed output similarity on "
          f"{cfg.extension_calib_requests} requests per domain of train-split text); "
          f"`dancemoe+budget({b:g})`: per token and layer the top-1 choice always runs, the "
          f"others only within a latency budget of {b:g} x the cluster's mean cost of one "
          f"remote choice; `dancemoe+drop({tau:g})`: remote choices with gate < {tau:g} are "
          f"skipped. Each transforms the evaluation trace's recorded routing layer by layer with "
          f"the DanceMoE placement's hosts and is costed by the same cost model. Only small_moe "
          f"has real weights, so only it gets substitution and budgeted selection and a "
          f"measured loss change (delta NLL: mean next-token loss in nats/byte on the "
          f"evaluation trace's own held-out text, model run with the transform inside every MoE "
          f"layer, against the plain model); the other models (routing statistics or mapped "
          f"traces, no weights) get only the weight-free drop, loss n/a (no weights).")


def format_markdown(cfg: ExperimentConfig, rows: Sequence[dict], command: str = "",
                    crosscheck: Sequence[dict] | None = None,
                    crosscheck_note: str = "") -> str:
  """``tables.md``: setup, headline, one table per model, the cross-check."""
  ok = ok_rows(rows)
  models = list(dict.fromkeys(r["model"] for r in rows))
  workloads = {r["model"]: r["workload"] for r in rows}
  out = ["# Latency and communication of expert placement on edge clusters", ""]
  if command:
    out += [f"Made by `{command}` (config `{cfg.name}`, seed {cfg.seed}).", ""]
  out += [
      "**Setup.** Clusters " + ", ".join(f"`{c}`" for c in cfg.clusters) +
      f" at {cfg.link_gbps:g} Gbps (configs/clusters). Placements are planned on a profiling "
      f"trace and costed on a separate evaluation trace of the same distribution "
      f"(seed {cfg.seed} + {cfg.profile_seed_offset} vs seed {cfg.seed}) by the cost model "
      f"(moe_edge/cost): decode = {cfg.decode_batch} concurrent requests per server, latency "
      f"per token = mean step time; prefill = {cfg.prefill_requests} request(s) per server per "
      f"step, latency per request batch; cross-server bytes per token (dispatch + combine, "
      f"bf16 activations); local coverage = share of token-choices served on the token's own "
      f"server. Objective J = the placement objective (objective.py) on the profiling "
      f"statistics; 'J vs ILP' = J / J_ILP - 1 where the ILP solves (N*L*E <= "
      f"{ILP_MAX_SIZE}, {cfg.ilp_time_limit:g} s limit).", "",
      f"**Memory.** Real edge servers do not hold every expert (their memory also serves the KV "
      f"cache and other work), so every server gets a share of {cfg.copies:g} copies of the "
      f"model's experts, in proportion to its datasheet memory "
      f"(moe_edge.config.with_expert_memory):", ""]
  out += memory_lines(cfg) + [""]
  out += ["**Calibration** (" + cfg.calibration + "): " +
          "; ".join(calib.describe(cfg.calibration, models)) + ". Columns "
          "`decode_ms_datasheet` / `prefill_ms_datasheet` of tables.csv give the same placements "
          "under the plain datasheet roofline.", ""]
  out += ["**Workloads.**", ""] + [f"- {m}: {workloads[m]}" for m in models] + [""]
  if any(r.get("extension") for r in rows):
    out += ["**Extensions** (moe_edge/extensions, rows `dancemoe+...`, not placement methods: "
            "they change the routing on the DanceMoE placement, and the headline ignores "
            "them). " + extension_note(cfg), ""]
  out += ["## Headline", ""]
  base = [b for b in registry.names("baseline") if any(r["method"] == b for r in ok)]
  for ours in ours_present(rows):
    out += [format_headline(headline(rows, ours=ours)), ""]
    if ours == "latency_search" and any("planned_request_ms" in r for r in ok):
      lp = (f"the larger of the coupled bound and the facility-location LP "
            f"(placement/lp_bound.py) on settings of at most {cfg.bound_lp_max_cells:,} LP "
            f"routing variables N (N - 1) L E, whose rounded hosting is also a best_known start"
            if cfg.bound_lp_max_cells else "the coupled bound (the LP is off: "
            "bound_lp_max_cells = 0)")
      out += ["Issue 18's goals for the latency search (moe_edge/experiments/gaps.py; lower "
              f"bound: placement/bounds.py, {lp}):", "",
              format_goals(rows, ours, base), "",
              "Per setting (latency_search's reduction on the evaluation trace; the bound's "
              "largest possible reduction and 'unreachable (bound)' on planned values):", "",
              format_goal_table(rows, ours, base), ""]
  if cfg.calibration != "datasheet" and ok and "decode_ms_datasheet" in ok[0]:
    out += ["Sensitivity: the same placements under the datasheet calibration (efficiency 1.0):",
            ""]
    for ours in ours_present(rows):
      alt = headline(rows, "decode_ms_datasheet", "prefill_ms_datasheet", ours)
      out += [format_headline(dict(alt, bytes={}, ilp=[]), " (datasheet)"), ""]
  for m in models:
    out += [f"## {m}", "", f"Workload: {workloads[m]}.", "", format_model_table(rows, m), ""]
    if any("planned_request_ms" in r for r in rows if r["model"] == m):
      out += [f"Request latency ({cfg.request_rate:g} requests/s per server, "
              f"{cfg.request_output_tokens} output tokens; moe_edge/experiments/gaps.py: "
              f"'planned' = expected counts of the profiling problem, what latency_search "
              f"minimises and the lower bound bounds; gaps are on planned values):", "",
              format_gap_table(rows, m), ""]
  if crosscheck:
    out += ["## Cross-check: cost model vs the real dispatch", "", crosscheck_note, "",
            format_crosscheck(crosscheck), ""]
  return "\n".join(out)


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None
              ) -> Path:
  """Rows as CSV (``columns`` in order; missing values empty)."""
  cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO(newline="")
  w = csv.DictWriter(buf, fieldnames=cols, extrasaction="raise")
  w.writeheader()
  for r in rows:
    w.writerow({k: r.get(k, "") for k in cols})
  return atomic.write_text(path, buf.getvalue())


def read_rows(path: str | Path) -> list[dict]:
  """Rows of a CSV written by :func:`write_csv`, numbers and booleans parsed back."""
  def parse(v: str):
    if v in ("True", "False"):
      return v == "True"
    try:
      return int(v) if v.lstrip("-").isdigit() else float(v)
    except ValueError:
      return None if v == "" else v
  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_tables(cfg: ExperimentConfig, rows: Sequence[dict], out_dir: str | Path,
                 command: str = "", crosscheck: Sequence[dict] | None = None,
                 crosscheck_note: str = "", timings: dict | None = None,
                 plots: bool = True) -> str:
  """Write ``tables.csv``, ``tables.md`` (returned), plots and ``timings.json``."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  extra = REQUEST_COLUMNS if any(REQUEST_COLUMNS[0] in r for r in rows) else ()
  write_csv(rows, out / "tables.csv", COLUMNS + extra)
  md = format_markdown(cfg, rows, command, crosscheck, crosscheck_note)
  atomic.write_text(out / "tables.md", md + "\n")
  if crosscheck:
    write_csv(crosscheck, out / "crosscheck.csv")
  if timings is not None:
    atomic.write_json(out / "timings.json", timings)
  if plots:
    plot_tables(rows, out)
  return md


@dataclasses.dataclass(frozen=True)
class TablesResult:
  """What :func:`run_tables` made: the rows, the headline and the Markdown."""
  rows: list
  headline: dict
  markdown: str
  timings: dict


def run_tables(cfg: ExperimentConfig, out_dir: str | Path, small: dict | None = None,
               command: str = "", show_progress: bool = True, plots: bool = True,
               crosscheck: Sequence[dict] | None = None, crosscheck_note: str = "",
               small_note: str | None = None) -> TablesResult:
  """Compute and write the tables of ``cfg`` into ``out_dir`` (``small``, ``small_note``: see
  :func:`compute_rows`)."""
  per = len(cfg.methods) + 1
  with Progress(len(cfg.models) * len(cfg.clusters) * per, "tables",
                enabled=show_progress) as progress:
    rows, timings = compute_rows(cfg, small, progress, small_note)
  md = write_tables(cfg, rows, out_dir, command, crosscheck, crosscheck_note, timings, plots)
  return TablesResult(rows, headline(rows), md, timings)


def run_demo_tables(out_dir: str | Path, small_model_trace: str | Path | ActivationTrace |
                    None = None, echo: bool = False, show_progress: bool = True) -> str:
  """A small version of the tables (config ``demo``) in about a minute on two CPU cores.

  OLMoE-1B-7B and Mixtral-8x7B statistics on ``edge_hetero_4``, every method but ilp, small
  token counts; plus the small model when ``small_model_trace`` is given (a recorded trace or
  its path; its first half of steps profiles, its second half is costed). Writes
  ``tables.csv``, ``tables.md`` and the plots into ``out_dir`` and returns the Markdown
  (``echo=True`` also prints it).
  """
  cfg = load_experiment("demo")
  small = None
  if small_model_trace is not None:
    trace = (small_model_trace if isinstance(small_model_trace, ActivationTrace)
             else ActivationTrace.load(small_model_trace))
    if trace.model != "small_moe":
      raise ConfigError(f"run_demo_tables takes a small_moe trace, got one of {trace.model!r}.")
    matching = tuple(c for c in cfg.clusters
                     if cluster_config(c).num_servers == trace.num_servers)
    if not matching:
      raise ConfigError(f"the small-model trace has {trace.num_servers} servers but the demo's "
                        f"clusters {list(cfg.clusters)} have "
                        f"{[cluster_config(c).num_servers for c in cfg.clusters]}.")
    cfg = with_overrides(cfg, models=cfg.models + ("small_moe",), clusters=matching)
    small = {trace.num_servers: split_trace(trace)}
    note = (f"own routing of the trained small model, the trace given to run_demo_tables "
            f"({trace.num_tokens:,} tokens from {trace.source or 'an unnamed source'}): its first "
            f"half of steps profiles, its second half is costed")
  else:
    note = None
  result = run_tables(cfg, out_dir, small, command="moe_edge.experiments.tables."
                      "run_demo_tables", show_progress=show_progress, small_note=note)
  if echo:
    print(result.markdown)
  return result.markdown
