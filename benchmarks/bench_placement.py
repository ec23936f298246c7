"""Placement methods: how long they take, and how far each heuristic is from the ILP optimum.

(a) Speed: wall time of every method (routing included) on synthetic skewed problems of
    64 experts x 16 layers x 8 servers (OLMoE-1B-7B on the ``edge_hetero_8`` preset) and
    256 experts x 61 layers x 64 servers (a DeepSeek-V3-shaped model on 64 edge GPUs in 8 racks
    of 8), memory for ~1.5 copies of the experts; best of ``--repeats`` runs, checked against
    dancemoe's goals (50 ms and 1 s).
(b) Quality: on ``--instances`` seeded problems per cluster (``tiny``: 2 layers x 8 experts, on
    ``edge_hetero_4`` and ``edge_hetero_8`` with 1.5x memory), each heuristic's objective
    (``moe_edge/placement/objective.py``) relative to the ILP optimum: mean and max gap
    (goal: dancemoe within 2% on average), with dancemoe's ablations and dancemoe_refined
    (which minimises the cost model's latency instead, so its J is not expected to be optimal).

(c) Real statistics: OLMoE-1B-7B and Mixtral-8x7B (traces sampled from their measured
    per-domain routing counts, one home domain per server, alpha 0.8) on ``edge_hetero_4`` with
    1.5 copies of memory: every method's objective against the ILP forced past its size limit
    with ``--real_ilp_time_limit`` seconds (OLMoE's MILP has 20k binaries; the ILP's proven
    lower bound gives the gap even when HiGHS stops at the limit).

(d) The latency search (``placement/search.py``): its median wall time on the two sizes of (a)
    as a multiple of dancemoe's in the same run, against its goals (1 s and 10 s), and the
    expected request latency of its start and its result (``--search_only`` runs only this).
(e) Issue 18's goals on the tables' settings (OLMoE-1B-7B and Mixtral-8x7B real statistics on
    edge_hetero_4 and edge_hetero_8, 1 Gbps, 1.5 copies, h100_kernels; planned on the profiling
    trace, costed on the evaluation trace; ``--goals_rate`` requests/s per server, 128-token
    prompts and outputs): prism, the baselines, dancemoe(_refined), latency_search, best_known
    and the lower bound; the search's gap to best_known and to the best baseline and prism, and
    how far below them the bound allows (``--goals_only`` runs only this).

Frequencies of (a) and (b) are synthetic: per server and layer, a Zipf(``--zipf``) law over a
random expert order, mixed with weight ``--mix`` with a Zipf law shared by all servers of that
layer.

Run:
  .venv/bin/python benchmarks/bench_placement.py
  .venv/bin/python benchmarks/bench_placement.py --instances 5 --repeats 1 --skip_large \
      --real_ilp_time_limit 0
  .venv/bin/python benchmarks/bench_placement.py --search_only
  .venv/bin/python benchmarks/bench_placement.py --goals_only
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moe_edge.config import (ClusterConfig, ModelConfig, cluster_config, model_config,
                             with_expert_memory)
from moe_edge.cost import CostModel
from moe_edge.cost.request_latency import request_latency, workload_batches
from moe_edge.experiments.calibration import edge_calibration
from moe_edge.experiments.config import load_experiment
from moe_edge.experiments.costing import cost_placement, phase_traces
from moe_edge.experiments.workloads import build_workload
from moe_edge.io import cli
from moe_edge.placement import ilp, place, registry
from moe_edge.placement.bounds import latency_lower_bound
from moe_edge.placement.layer_state import LayerState
from moe_edge.placement.search import placement_score
from moe_edge.placement.registry import PlacementContext, WorkloadSummary
from moe_edge.placement.objective import objective
from moe_edge.placement.problem import PlacementError, PlacementProblem

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Timed runs per method and size (the best is reported).")
flags.DEFINE_integer("instances", 20, "Seeded small instances per cluster for the ILP gap.")
flags.DEFINE_string("quality_clusters", "edge_hetero_4,edge_hetero_8",
                    "Cluster presets of the quality study (the tiny model, 2 x 8 experts).")
flags.DEFINE_float("copies", 1.5, "Expert memory, in copies of all experts.")
flags.DEFINE_float("zipf", 1.0, "Zipf exponent of the synthetic frequencies.")
flags.DEFINE_float("mix", 0.5, "Weight of the layer-wide Zipf law shared by all servers.")
flags.DEFINE_float("lam", 1.0, "Load-balance weight of the objective.")
flags.DEFINE_float("ilp_time_limit", 60.0, "Seconds per ILP.")
flags.DEFINE_bool("skip_large", False, "Skip the 256 x 61 x 64 timing.")
flags.DEFINE_float("real_ilp_time_limit", 120.0, "Seconds for each ILP of part (c); 0 skips (c).")
flags.DEFINE_bool("search_only", False, "Run only part (d), the latency search.")
flags.DEFINE_bool("goals_only", False, "Run only part (e), the request-latency goals.")
flags.DEFINE_string("goals_settings", "olmoe_1b_7b/edge_hetero_4,mixtral_8x7b/edge_hetero_4,"
                    "olmoe_1b_7b/edge_hetero_8,mixtral_8x7b/edge_hetero_8",
                    "Part (e): model/cluster settings of the tables' workload.")
flags.DEFINE_float("goals_rate", 0.1, "Part (e): requests/s arriving at each server.")
flags.DEFINE_integer("search_repeats", 3, "Timed runs of part (d) per size (the median counts).")

GOALS_S = {"64x16x8": 0.05, "256x61x64": 1.0}  # dancemoe's placement-time goals
SEARCH_GOALS_S = {"64x16x8": 1.0, "256x61x64": 10.0}  # latency_search's (issue 18)
# Methods of parts (a)-(c): every registered one but the long search oracle (part (d) times
# the latency search against it).
METHODS = tuple(m for m in registry.names() if m != "best_known")


def zipf_frequencies(rng: np.random.Generator, n: int, l: int, e: int, k: int, skew: float,
                     mix: float) -> np.ndarray:
  """``[N, L, E]`` per-server skewed frequencies, each row summing to ``k``."""
  law = 1.0 / np.arange(1, e + 1) ** skew
  law /= law.sum()
  shared = law[np.argsort(rng.random((1, l, e)), axis=2)]
  own = law[np.argsort(rng.random((n, l, e)), axis=2)]
  return k * (mix * shared + (1 - mix) * own)


def racks_cluster(n: int, rack: int, link_gbps: float = 10.0) -> ClusterConfig:
  """``n`` edge GPUs (4090 / 3090 / A4000 / Orin AGX in turn), racks of ``rack``; links across
  racks have half the bandwidth and twice the latency."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs" / "clusters"))
  from _devices import A4000, GBPS, ORIN_AGX_32, RTX3090, RTX4090  # noqa: PLC0415
  kinds = (RTX4090, RTX3090, A4000, ORIN_AGX_32)
  servers = tuple(kinds[i % len(kinds)] for i in range(n))
  same = [[i // rack == j // rack for j in range(n)] for i in range(n)]
  bw = tuple(tuple(link_gbps * GBPS * (1.0 if same[i][j] else 0.5) for j in range(n))
             for i in range(n))
  lat = tuple(tuple(1e-4 * (1.0 if same[i][j] else 2.0) for j in range(n)) for i in range(n))
  return ClusterConfig(f"edge_racks_{n}x{rack}", servers, bw, lat, source="bench_placement")


def memory_capacity(cluster: ClusterConfig, num_experts: int, copies: float) -> np.ndarray:
  """``[N]`` experts per server: ``copies`` sets split in proportion to datasheet memory."""
  mem = np.array([s.memory_bytes for s in cluster.servers])
  return np.floor(copies * num_experts * mem / mem.sum()).astype(np.int64) + 1


def speed_problems(seed: int = 0) -> dict[str, PlacementProblem]:
  """The two timing instances (module docstring)."""
  rng = np.random.default_rng(seed)
  out = {}
  olmoe = model_config("olmoe_1b_7b")
  c8 = cluster_config("edge_hetero_8")
  n, l, e = c8.num_servers, olmoe.n_moe_layers, olmoe.n_experts
  out["64x16x8"] = PlacementProblem.build(
      olmoe, c8, zipf_frequencies(rng, n, l, e, olmoe.top_k, FLAGS.zipf, FLAGS.mix),
      capacity=memory_capacity(c8, l * e, FLAGS.copies))
  if not FLAGS.skip_large:
    big = ModelConfig(name="deepseek_v3_shape", vocab_size=129280, d_model=7168, n_layers=61,
                      n_heads=128, n_kv_heads=128, head_dim=128, n_experts=256, top_k=8,
                      d_ff_expert=2048, bytes_per_param=1, source="DeepSeek-V3 MoE shape")
    c64 = racks_cluster(64, 8)
    n, l, e = 64, big.n_moe_layers, big.n_experts
    out["256x61x64"] = PlacementProblem.build(
        big, c64, zipf_frequencies(rng, n, l, e, big.top_k, FLAGS.zipf, FLAGS.mix),
        capacity=memory_capacity(c64, l * e, FLAGS.copies))
  return out


def time_methods(problems: dict[str, PlacementProblem]) -> None:
  """Part (a): best-of-repeats wall time (and process CPU time) per method and size."""
  sizes = list(problems)
  print(f"(a) placement time, best of {FLAGS.repeats}: wall ms (CPU ms of this process), "
        f"routing, validation and the objective included; memory {FLAGS.copies:g} copies")
  print(f"{'method':16s}" + "".join(f"{s:>22s}" for s in sizes) + "   goal")
  rows = [(m, m, {}) for m in METHODS]
  rows.insert(1, ("dancemoe/-exchange", "dancemoe", {"exchange": False}))
  for label, method, opts in rows:
    cells, verdict = [], ""
    for size in sizes:
      problem = problems[size]
      try:
        wall, cpu = map(min, zip(*[_timed(method, problem, opts)
                                   for _ in range(FLAGS.repeats)]))
        cells.append(f"{1e3 * wall:.1f} ({1e3 * cpu:.1f})")
        if label == "dancemoe":
          ok = wall <= GOALS_S[size]
          verdict += f" {size} <= {1e3 * GOALS_S[size]:g} ms: {'met' if ok else 'MISSED'};"
      except PlacementError:
        n, l, e = problem.shape
        cells.append("refused")
        verdict += f" {size}: N*L*E = {n * l * e:,} > {ilp.MAX_SIZE};"
    print(f"{label:16s}" + "".join(f"{c:>22s}" for c in cells) + "  " + verdict)


def _with_lam(method: str, opts: dict) -> dict:
  """``opts`` plus ``lam=--lam`` for the methods that have the option (not the oracle, whose
  own ``lam`` each part passes)."""
  has = "lam" in registry.option_fields(method) and registry.role(method) != "oracle"
  return {"lam": FLAGS.lam, **opts} if has else opts


def _timed(method: str, problem: PlacementProblem, opts: dict) -> tuple[float, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  place(method, problem, seed=0, **_with_lam(method, opts))
  return time.perf_counter() - wall, time.process_time() - cpu


def quality(cluster_name: str) -> None:
  """Part (b): objective gap to the ILP optimum on seeded small instances."""
  model = model_config("tiny")
  cluster = with_expert_memory(cluster_config(cluster_name), model, FLAGS.copies)
  n, l, e = cluster.num_servers, model.n_moe_layers, model.n_experts
  runs = {m: (m, {}) for m in METHODS if registry.role(m) != "oracle"}
  runs.update({"dancemoe/-exchange": ("dancemoe", dict(exchange=False)),
               "dancemoe/-budgets": ("dancemoe", dict(entropy_budgets=False)),
               "dancemoe/-hetero": ("dancemoe", dict(hetero_aware=False)),
               "dancemoe/-replicas": ("dancemoe", dict(replicas=False))})
  gaps = {m: [] for m in runs}
  proven = []
  for seed in range(FLAGS.instances):
    rng = np.random.default_rng(1000 + seed)
    problem = PlacementProblem.build(model, cluster, zipf_frequencies(
        rng, n, l, e, model.top_k, FLAGS.zipf, FLAGS.mix), tokens=rng.uniform(0.5, 2.0, n))
    best = place("ilp", problem, lam=FLAGS.lam, time_limit=FLAGS.ilp_time_limit)
    proven.append(best.info["gap"])
    for row, (m, opts) in runs.items():
      got = place(m, problem, seed=seed, **_with_lam(m, opts))
      gaps[row].append(objective(problem, got, FLAGS.lam) / best.info["objective"] - 1.0)
  print(f"\n(b) objective gap to the ILP optimum: {FLAGS.instances} instances, {cluster.name}, "
        f"{l} layers x {e} experts x {n} servers, capacity {problem.capacity.tolist()}, "
        f"lam={FLAGS.lam:g} (largest proven ILP gap {max(proven):.1e})")
  print(f"{'method':20s}{'mean gap':>10s}{'max gap':>10s}")
  for row, g in gaps.items():
    g = 100 * np.array(g)
    print(f"{row:20s}{g.mean():9.2f}%{g.max():9.2f}%")
  mean = 100 * np.mean(gaps["dancemoe"])
  print(f"goal: dancemoe within 2% of the ILP's J on average: "
        f"{'met' if mean <= 2.0 else 'MISSED'} ({mean:.2f}%)")
  print("(dancemoe_refined trades J for the cost model's expected latency, which J does not "
        "model; dancemoe/-exchange is the greedy without the exchange search)")


def real_statistics(cluster_name: str = "edge_hetero_4", tokens_per_server: int = 8192) -> None:
  """Part (c): the objective of every method on the real OLMoE / Mixtral statistics, against
  the ILP's best placement and its proven lower bound."""
  from moe_edge.workload.stats_traces import sample_stats_trace  # noqa: PLC0415
  print(f"\n(c) real statistics on {cluster_name} ({FLAGS.copies:g} copies, alpha 0.8, "
        f"{tokens_per_server} tokens per server): objective J, gap to the ILP's best placement "
        f"and to its proven lower bound (ILP time limit {FLAGS.real_ilp_time_limit:g} s)")
  for name in ("olmoe_1b_7b", "mixtral_8x7b"):
    model = model_config(name)
    cluster = with_expert_memory(cluster_config(cluster_name), model, FLAGS.copies)
    trace = sample_stats_trace(name, cluster.num_servers, tokens_per_server, 0.8, seed=1000)
    problem = PlacementProblem.from_trace(trace, model, cluster)
    best = place("ilp", problem, lam=FLAGS.lam, time_limit=FLAGS.real_ilp_time_limit, force=True)
    j_ilp, bound = best.info["objective"], best.info["bound"] or float("nan")
    print(f"{name}: N*L*E = {np.prod(problem.shape):,}, ILP {best.info['status']} in "
          f"{best.info['time_s']:.1f} s, J = {j_ilp:.6g}, proven gap "
          f"{100 * (best.info['gap'] if best.info['gap'] is not None else float('nan')):.3f}%")
    print(f"  {'method':18s}{'J':>12s}{'vs ILP':>10s}{'vs bound':>10s}")
    for m in METHODS:
      if registry.role(m) == "oracle":
        continue
      got = place(m, problem, seed=0, **_with_lam(m, {}))
      j = objective(problem, got, FLAGS.lam)
      print(f"  {m:18s}{j:12.6g}{100 * (j / j_ilp - 1):9.2f}%{100 * (j / bound - 1):9.2f}%")


def search_workload(problem: PlacementProblem, rate: float) -> WorkloadSummary:
  """Part (d)'s workload: ``rate`` requests/s per server, 320-token prompts, 128 output
  tokens, 8 decoding requests per step, one prompt per prefill step."""
  n = problem.shape[0]
  f = lambda v: np.full(n, float(v))  # noqa: E731
  return WorkloadSummary(request_rate=f(rate), prompt_tokens=f(320), output_tokens=f(128),
                         decode_batch=f(8), prefill_tokens=f(320))


def time_search(problems: dict[str, PlacementProblem]) -> None:
  """Part (d): the latency search's median wall time against dancemoe's in the same run (its
  goals: 1 s at 64 x 16 x 8, 10 s at 256 x 61 x 64), and its gain over its start. The request
  rate keeps every queue stable (0.1/s per server; 0.02/s on the 64-GPU DeepSeek-V3 shape, whose
  steps take seconds)."""
  print(f"\n(d) latency search (expected request latency): median of {FLAGS.search_repeats} "
        f"runs, wall s, and as a multiple of dancemoe's median in the same run")
  print(f"{'size':12s}{'dancemoe s':>12s}{'search s':>10s}{'ratio':>8s}{'start':>16s}"
        f"{'start lat s':>13s}{'search lat s':>14s}   goal")
  for size, problem in problems.items():
    rate = 0.02 if problem.shape[0] > 16 else 0.1
    ctx = PlacementContext(seed=0, workload=search_workload(problem, rate))
    dm, srch = [], []
    for _ in range(FLAGS.search_repeats):
      t = time.perf_counter()
      registry.place("dancemoe", problem, None, ctx)
      dm.append(time.perf_counter() - t)
      t = time.perf_counter()
      got = registry.place("latency_search", problem, None, ctx)
      srch.append(time.perf_counter() - t)
    d, s_ = float(np.median(dm)), float(np.median(srch))
    ok = s_ <= SEARCH_GOALS_S[size]
    print(f"{size:12s}{d:12.3f}{s_:10.3f}{s_ / d:8.1f}{got.info['start']:>16s}"
          f"{got.info['start_score']:13.4f}{got.info['score']:14.4f}   <= "
          f"{SEARCH_GOALS_S[size]:g} s: {'met' if ok else 'MISSED'}")


GOAL_METHODS = ("prism", "eplb_hetero", "eplb", "uniform_ep", "redundance", "smartmoe",
                "dancemoe", "dancemoe_refined", "latency_search", "best_known")


def goals_setting(model_name: str, cluster_name: str) -> dict:
  """Part (e) on one setting of the tables (``edge_tables`` config: real routing statistics,
  1 Gbps, 1.5 copies, h100_kernels calibration; planned on the profiling trace, costed on the
  evaluation trace): every method of :data:`GOAL_METHODS`, decode ms/token and prefill
  ms/request on the evaluation trace, the request latency of those step times and the
  expected request latency the search minimises (on the planning problem), plus the lower
  bound. Returns ``{method: row}``."""
  cfg = load_experiment("edge_tables")
  work = build_workload(cfg, model_name, cluster_config(cluster_name).num_servers)
  cluster = with_expert_memory(cluster_config(cluster_name, link_gbps=cfg.link_gbps),
                               work.model, cfg.copies)
  cal = edge_calibration(cfg.calibration, cluster, model_name)
  problem = PlacementProblem.from_trace(work.profile, work.model, cluster, calibration=cal)
  phases = phase_traces(work.trace, "both", cfg.decode_batch, cfg.prefill_requests)
  n = cluster.num_servers
  f = lambda v: np.full(n, float(v))  # noqa: E731
  wl = WorkloadSummary(request_rate=f(FLAGS.goals_rate), prompt_tokens=f(cfg.request_len),
                       output_tokens=f(cfg.request_len), decode_batch=f(cfg.decode_batch),
                       prefill_tokens=f(cfg.request_len * cfg.prefill_requests))
  ctx = PlacementContext(seed=cfg.seed, cost=CostModel.build(work.model, cluster, cal),
                         workload=wl)
  rows = {}
  for m in GOAL_METHODS:
    t = time.perf_counter()
    pl = registry.place(m, problem, None, ctx)
    sec = time.perf_counter() - t
    rep = cost_placement(pl, phases, work.model, cluster, cal)
    d, p = rep["decode"].latency, rep["prefill"].latency
    rows[m] = dict(decode_ms=1e3 * d, prefill_ms=1e3 * p,
                   request_s=request_latency(d, p, wl).mean,
                   expected_s=placement_score(problem, pl, ctx.cost.hardware, wl),
                   seconds=sec, placement=pl)
  bk = rows["best_known"]["placement"]
  st = LayerState.build(ctx.cost.hardware, problem.freq, np.stack(workload_batches(wl)),
                        bk.hosts, bk.route)
  lb, dec, pre = latency_lower_bound(problem, ctx.cost.hardware, wl, tuple(st.step_times()))
  rows["lower_bound"] = dict(expected_s=lb, decode_step_ms=1e3 * dec.step,
                             prefill_step_ms=1e3 * pre.step)
  return rows


def _goal_lines(rows: dict) -> list[str]:
  """The search against the best baseline, prism and best_known; what the bound allows."""
  base = [m for m in GOAL_METHODS if registry.role(m) == "baseline"]
  lb = rows["lower_bound"]["expected_s"]
  out = []
  for key in ("expected_s", "request_s", "decode_ms"):
    b = min(base, key=lambda m: rows[m][key])
    v = rows["latency_search"][key]
    line = (f"  {key}: search {100 * (v / rows[b][key] - 1):+.1f}% vs best baseline ({b}), "
            f"{100 * (v / rows['prism'][key] - 1):+.1f}% vs prism, "
            f"{100 * (v / rows['best_known'][key] - 1):+.2f}% vs best_known")
    if key == "expected_s":
      line += (f"; the bound allows at most {100 * (1 - lb / rows[b][key]):.1f}% below the "
               f"best baseline and {100 * (1 - lb / rows['prism'][key]):.1f}% below prism")
    out.append(line)
  return out


def latency_goals() -> None:
  """Part (e): issue 18's goals on the tables' settings (module docstring)."""
  print(f"\n(e) expected request latency on the tables' settings ({FLAGS.goals_rate:g} "
        f"requests/s per server): decode / prefill on the evaluation trace, the request latency "
        f"of those steps, and the expected request latency on the planning problem (what the "
        f"search minimises)")
  for setting in FLAGS.goals_settings.split(","):
    model_name, cluster_name = setting.strip().split("/")
    rows = goals_setting(model_name, cluster_name)
    print(f"{model_name} on {cluster_name}:")
    print(f"  {'method':18s}{'decode ms':>11s}{'prefill ms':>12s}{'request s':>11s}"
          f"{'expected s':>12s}{'place s':>9s}")
    for m in GOAL_METHODS:
      r = rows[m]
      print(f"  {m:18s}{r['decode_ms']:11.2f}{r['prefill_ms']:12.1f}{r['request_s']:11.3f}"
            f"{r['expected_s']:12.3f}{r['seconds']:9.2f}")
    lb = rows["lower_bound"]
    print(f"  {'lower bound':18s}{'':34s}{lb['expected_s']:12.3f}   (expected decode step >= "
          f"{lb['decode_step_ms']:.2f} ms, prefill step >= {lb['prefill_step_ms']:.1f} ms)")
    print("\n".join(_goal_lines(rows)), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.check_flags(FLAGS, at_least_1=("repeats", "instances"),
                  ranges={"copies": (1.0, math.inf, False), "zipf": (0.0, math.inf, False),
                          "mix": (0.0, 1.0, False), "lam": (0.0, math.inf, False),
                          "ilp_time_limit": (0.0, math.inf, True),
                          "real_ilp_time_limit": (0.0, math.inf, False)})
  for name in FLAGS.quality_clusters.split(","):
    if name.strip():
      cluster_config(name.strip())  # an unknown cluster fails now, not after the timings
  if FLAGS.search_only:
    time_search(speed_problems())
    return
  if FLAGS.goals_only:
    latency_goals()
    return
  time_methods(speed_problems())
  for name in FLAGS.quality_clusters.split(","):
    if name.strip():
      quality(name.strip())
  if FLAGS.real_ilp_time_limit > 0:
    real_statistics()
  time_search(speed_problems())
  latency_goals()


if __name__ == "__main__":
  cli.run(main)
