"""The tables: consistent rows, the headline's arithmetic, determinism, presets, the demo."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import ConfigError, load_preset
from moe_edge.core.errors import CostError
from moe_edge.cost import decode_batches, evaluate, prefill_batches
from moe_edge.cost.request_latency import request_latency
from moe_edge.experiments import calibration as calib
from moe_edge.experiments.config import ExperimentConfig, load_experiment, with_overrides
from moe_edge.experiments.costing import (cost_placement, phase_traces, planning_context,
                                          workload_summary)
from moe_edge.experiments.tables import (compute_rows, headline, read_rows, run_demo_tables,
                                         run_tables, setting_cluster)
from moe_edge.experiments.workloads import build_workload
from moe_edge.placement import registry
from moe_edge.placement.problem import PlacementProblem
from moe_edge.workload.traces import ActivationTrace

BASELINES = registry.names("baseline")

TINY = ExperimentConfig(
    name="test_tiny", models=("olmoe_1b_7b", "mixtral_8x7b"), clusters=("edge_hetero_4",),
    methods=("dancemoe", "uniform_ep", "random", "greedy_local", "eplb", "topology_aware",
             "ilp"),
    tokens_per_server=256, request_len=64, trace_cache="", decode_batch=4,
    ilp_time_limit=30.0)


@pytest.fixture(scope="module")
def tiny_rows(shared_data):
  return compute_rows(TINY)[0]


def test_rows_are_consistent_with_the_cost_model(tiny_rows):
  rows = tiny_rows
  assert len(rows) == 2 * 7
  by = {(r["model"], r["method"]): r for r in rows}
  # OLMoE (4 x 16 x 64 = 4096) and Mixtral (4 x 32 x 8) are within the tables' ILP size limit.
  assert by[("olmoe_1b_7b", "ilp")]["status"] == "ok"
  assert by[("mixtral_8x7b", "ilp")]["status"] == "ok"
  for r in rows:
    if r["status"] != "ok":
      continue
    assert 0.0 <= r["coverage"] <= 1.0 and r["fits"]
    assert r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["cross_kb_per_token"] >= 0
    # Decode + prefill latencies split into their parts.
    assert r["decode_ms"] == pytest.approx(
        r["decode_dense_ms"] + r["decode_exchange_ms"] + r["decode_compute_ms"], rel=1e-9)
    if r["model"] == "mixtral_8x7b":  # the ILP is optimal for J (to HiGHS's 1e-6 gap)
      assert r["gap_to_ilp"] >= -2e-6
    # The proven lower bound is below every placement's planned request latency and decode step.
    assert r["gap_to_bound"] >= -1e-9 and r["decode_gap_to_bound"] >= -1e-9
    # A request waits for its prefill and every output token's decode step (plus its queue).
    assert r["request_ms"] >= r["prefill_ms"] + TINY.request_output_tokens * r["decode_ms"]
  # Recompute one setting by hand: same workload, same placement, same costs.
  work = build_workload(TINY, "mixtral_8x7b", 4)
  cluster = setting_cluster(TINY, "edge_hetero_4", work.model)
  cal = calib.edge_calibration(TINY.calibration, cluster, "mixtral_8x7b")
  # Every method plans on the calibrated problem with the deployment's context
  # (costing.cost_methods).
  problem = PlacementProblem.from_trace(work.profile, work.model, cluster, calibration=cal)
  context = planning_context(problem, phase_traces(work.trace, "both", TINY.decode_batch),
                             TINY.decode_batch, TINY.seed, cal)
  for method in ("dancemoe", "eplb"):
    p = registry.place(method, problem, None, context)
    dec = evaluate(decode_batches(work.trace, TINY.decode_batch), work.model, cluster, p,
                   "decode", cal)
    pre = evaluate(prefill_batches(work.trace, 1), work.model, cluster, p, "prefill", cal)
    row = by[("mixtral_8x7b", method)]
    assert row["cross_kb_per_token"] == pytest.approx(dec.cross_bytes_per_token / 1e3)
    assert row["cross_kb_per_token"] == pytest.approx(pre.cross_bytes_per_token / 1e3)
    assert row["decode_ms"] == pytest.approx(1e3 * dec.latency)
    assert row["prefill_ms"] == pytest.approx(1e3 * pre.latency)
    assert row["coverage"] == pytest.approx(dec.coverage)
    lat = request_latency(dec.latency, pre.latency, context.workload)
    assert lat.stable and row["request_ms"] == pytest.approx(1e3 * lat.mean)
  # Mixtral is served at 4 bits as configured, OLMoE at bf16.
  assert by[("mixtral_8x7b", "dancemoe")]["bytes_per_param"] == 0.5
  assert by[("olmoe_1b_7b", "dancemoe")]["bytes_per_param"] == 2


def test_headline_matches_a_direct_computation(tiny_rows):
  head = headline(tiny_rows)
  by = {(r["model"], r["method"]): r for r in tiny_rows if r["status"] == "ok"}
  models = ("olmoe_1b_7b", "mixtral_8x7b")
  baselines = [b for b in BASELINES if all((m, b) in by for m in models)]
  assert baselines, "the tiny preset runs no baseline"
  for key, name in (("decode_ms", "decode"), ("cross_kb_per_token", "bytes")):
    assert set(head[name]) - {"best"} == set(baselines)
    for b in baselines:
      ratios = np.array([by[(m, "dancemoe")][key] / by[(m, b)][key] for m in models])
      assert head[name][b]["reduction"] == pytest.approx(1 - np.prod(ratios) ** 0.5)
      assert head[name][b]["wins"] == int((ratios < 1).sum())
    best = np.array([by[(m, "dancemoe")][key] / min(by[(m, b)][key] for b in baselines)
                     for m in models])
    assert head[name]["best"]["max_reduction"] == pytest.approx(1 - best.min())
  olmoe, ilp = head["ilp"]
  assert olmoe["model"] == "olmoe_1b_7b" and olmoe["binaries"] == 4 * 16 * 64 * 5
  assert ilp["model"] == "mixtral_8x7b" and ilp["binaries"] == 4 * 32 * 8 * 5
  assert ilp["dancemoe_gap"] == pytest.approx(by[("mixtral_8x7b", "dancemoe")]["gap_to_ilp"])


def test_two_runs_write_identical_csv(tmp_path, shared_data):
  cfg = with_overrides(load_experiment("demo"), tokens_per_server=256,
                       methods=("dancemoe", "uniform_ep", "random", "eplb"))
  a = run_tables(cfg, tmp_path / "a", show_progress=False, plots=False)
  b = run_tables(cfg, tmp_path / "b", show_progress=False, plots=False)
  assert (tmp_path / "a" / "tables.csv").read_bytes() == (tmp_path / "b" / "tables.csv"
                                                          ).read_bytes()
  assert "## Headline" in a.markdown and "mixtral_8x7b" in a.markdown
  back = read_rows(tmp_path / "a" / "tables.csv")
  assert [r["method"] for r in back] == [r["method"] for r in a.rows]
  assert back[0]["decode_ms"] == pytest.approx(a.rows[0]["decode_ms"])
  other = run_tables(dataclasses.replace(cfg, seed=1), tmp_path / "c", show_progress=False,
                     plots=False)
  assert other.rows[0]["decode_ms"] != a.rows[0]["decode_ms"]


def test_demo_tables_take_the_small_model_trace(tmp_path, shared_data):
  rng = np.random.default_rng(0)
  t, req_len = 4 * 6 * 32, 32
  logits = rng.gumbel(size=(t, 4, 16))
  ids = np.argsort(-logits, axis=-1)[..., :2].astype(np.int32)
  request = np.arange(t) // req_len
  trace = ActivationTrace(
      expert_ids=ids, gate_weights=np.full(ids.shape, 0.5, np.float32),
      server=(request % 4).astype(np.int32), request=request.astype(np.int32),
      position=(np.arange(t) % req_len).astype(np.int32), step=(request // 4).astype(np.int32),
      model="small_moe", num_experts=16, num_servers=4, source="test")
  md = run_demo_tables(tmp_path, trace, show_progress=False)
  rows = read_rows(tmp_path / "tables.csv")
  assert {r["model"] for r in rows} == {"olmoe_1b_7b", "mixtral_8x7b", "small_moe"}
  assert "## small_moe" in md and (tmp_path / "decode_latency.png").is_file()
  assert all(r["status"] == "ok" for r in rows)


def test_presets_and_bad_names():
  for name in ("edge_tables", "demo", "ablations"):
    assert isinstance(load_experiment(name), ExperimentConfig)
  with pytest.raises(ConfigError, match="Unknown experiment config 'nope'.*edge_tables"):
    load_preset("experiments", "nope")
  with pytest.raises(ConfigError, match="unknown methods entry 'magic'"):
    with_overrides(load_experiment("demo"), methods=("dancemoe", "magic"))
  with pytest.raises(ConfigError, match="copies"):
    with_overrides(load_experiment("demo"), copies=0.5)
  with pytest.raises(ConfigError, match="calibration"):
    with_overrides(load_experiment("demo"), calibration="guess")
  with pytest.raises(ConfigError, match="unknown ExperimentConfig fields"):
    with_overrides(load_experiment("demo"), colour="red")


def test_command_lines(tmp_path, shared_data):
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from pathlib import Path  # noqa: PLC0415
  repo = Path(__file__).resolve().parents[2]
  env = dict(os.environ, MOE_EDGE_DATA=str(shared_data), JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True,  # noqa
                                     env=env, cwd=repo, timeout=300)
  out = tmp_path / "tables"
  proc = run("experiments/reproduce_tables.py", "--config", "demo", "--out", str(out),
             "--config.methods=dancemoe", "--config.methods=uniform_ep",
             "--config.models=mixtral_8x7b", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Headline (dancemoe):" in proc.stdout and "uniform_ep" in proc.stdout
  rows = read_rows(out / "tables.csv")
  assert [r["method"] for r in rows] == ["dancemoe", "uniform_ep"]
  for png in ("decode_latency.png", "prefill_latency.png", "cross_bytes.png"):
    (out / png).unlink()
  proc = run("experiments/plot.py", "--tables", str(out), "--ablations", "")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / "decode_latency.png").is_file() and (out / "cross_bytes.png").is_file()
  bad = run("experiments/reproduce_tables.py", "--config", "nonsense", "--out", str(out))
  assert bad.returncode != 0 and "Known experiments: ablations, budget_sweep, demo," in bad.stderr
  bad = run("experiments/reproduce_tables.py", "--config", "demo", "--config.copies=0.5",
            "--out", str(out))
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      f"reproduce_tables.py: error: experiment 'demo': copies must be >= 1 (every expert held "
      f"at least once), got 0.5."]



def test_tables_workload_is_in_requests_per_second(shared_data):
  """The request rate every method plans for (and the tables' request latency) is the config's
  requests/s per server, not the trace's tokens per step: twice the tokens, the same rate, and
  the queues of a 0.1/s workload are stable."""
  work = build_workload(TINY, "mixtral_8x7b", 4)
  cluster = setting_cluster(TINY, "edge_hetero_4", work.model)
  problem = PlacementProblem.from_trace(work.profile, work.model, cluster)
  phases = phase_traces(work.trace, "both", TINY.decode_batch)
  wl = workload_summary(problem, phases, TINY.decode_batch, request_rate=0.1, output_tokens=64)
  np.testing.assert_array_equal(wl.request_rate, np.full(4, 0.1))
  np.testing.assert_array_equal(wl.output_tokens, np.full(4, 64.0))
  np.testing.assert_array_equal(wl.prompt_tokens, np.full(4, TINY.request_len))
  double = dataclasses.replace(problem, tokens=2 * problem.tokens)
  np.testing.assert_array_equal(
      workload_summary(double, phases, TINY.decode_batch, 0.1).request_rate, wl.request_rate)
  p = registry.place("uniform_ep", problem)
  rep = cost_placement(p, phases, work.model, cluster)
  assert request_latency(rep["decode"].latency, rep["prefill"].latency, wl).stable
  with pytest.raises(CostError, match="request_rate must be a positive number"):
    workload_summary(problem, phases, TINY.decode_batch, request_rate=0.0)
