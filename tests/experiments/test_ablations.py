"""Ablation sweeps, their clusters, the progress display and the cost-model cross-check."""
import dataclasses
import io
import math

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge.experiments.config import ExperimentConfig
from moe_edge.experiments.progress import Progress
from moe_edge.experiments.sweeps import (SweepError, cycled_cluster, everything_everywhere,
                                         migration_summary, run_sweep)
from moe_edge.migration.drift import drift_preset
from moe_edge.workload.traces import ActivationTrace

CFG = ExperimentConfig(
    name="test_sweeps", models=("mixtral_8x7b",), clusters=("edge_hetero_4",),
    sweep_models=("mixtral_8x7b",), sweep_methods=("dancemoe", "uniform_ep", "greedy_local"),
    sweep_tokens_per_server=256, request_len=64, decode_batch=4, trace_cache="",
    link_gbps_values=(0.25, 1.0, 4.0), copies_values=(1.0, 2.0, math.inf),
    migration_steps=12, migration_interval=4, migration_request_len=32, migration_max_moves=6)


def test_cycled_cluster_and_full_memory():
  types = [s.name for s in cluster_config("edge_hetero_8").servers]
  c = cycled_cluster(11, link_gbps=2.0)
  assert [s.name for s in c.servers] == [types[i % 8] for i in range(11)]
  bw = c.bandwidth_matrix
  assert np.all(bw[~np.eye(11, dtype=bool)] == 2.0 * 1e9 / 8)
  model = model_config("olmoe_1b_7b")
  full = everything_everywhere(cluster_config("edge_hetero_4"), model)
  assert np.all(full.expert_capacity(model) == model.n_moe_layers * model.n_experts)
  with pytest.raises(SweepError):
    cycled_cluster(0)


def test_pairs_drift_preset():
  d = drift_preset("pairs", 4, 96, 8)
  (s1, h1), (s2, h2) = d.changes
  assert (s1, s2) == (32, 64)
  assert h1 == ("book", "arxiv", "c4", "github") and h2 == ("book", "arxiv", "github", "c4")


def test_sweeps_vary_one_knob(shared_data):
  rows = run_sweep(CFG, "link_bandwidth")
  assert {r["x"] for r in rows} == {0.25, 1.0, 4.0}
  for m in CFG.sweep_methods:
    mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["x"])
    # Bytes do not depend on the link speed for a placement that does not either.
    if m != "dancemoe":
      assert len({round(r["cross_kb_per_token"], 9) for r in mine}) == 1
    if m == "uniform_ep":  # same placement everywhere: faster links, never slower steps
      lat = [r["decode_ms"] for r in mine]
      assert all(a >= b for a, b in zip(lat, lat[1:]))
  mem = run_sweep(CFG, "memory")
  xs = sorted({r["x"] for r in mem})
  assert xs[0] >= 1.0 and xs[-1] == pytest.approx(4.0)  # every expert on each of 4 servers
  full = [r for r in mem if r["setting"] == "every expert everywhere"]
  assert {r["method"]: r["coverage"] for r in full}["greedy_local"] == pytest.approx(1.0)
  parts = run_sweep(CFG, "parts")
  assert {r["method"] for r in parts} == {"dancemoe_refined", "uniform_ep", "no_entropy_budgets",
                                          "no_hetero_aware", "no_replicas", "no_exchange",
                                          "no_refine"}


def test_migration_sweep(shared_data):
  cfg = dataclasses.replace(CFG, sweep_models=("olmoe_1b_7b",))
  rows = run_sweep(cfg, "migration")
  assert len(rows) == 3 * 3  # 3 intervals x 3 policies
  first = [r for r in rows if r["interval"] == 0]
  assert len({round(r["decode_ms"], 9) for r in first}) == 1  # one initial placement
  for r in rows:
    if r["method"] == "none":
      assert r["moves"] == 0
    if r["method"] == "incremental":
      assert r["moves"] <= cfg.migration_max_moves
  summ = {s["policy"]: s for s in migration_summary(rows)}
  assert summ["none"]["moves"] == 0 and summ["incremental"]["intervals"] == 2


def test_progress_lines():
  out = io.StringIO()
  with Progress(4, "work", stream=out) as p:
    p.update("a")
    p.update("b", units=2)
    p.note("hello")
  text = out.getvalue().splitlines()
  assert text[0].startswith("work [") and "1/4" in text[0] and text[0].endswith("a")
  assert "3/4" in text[1] and "75%" in text[1]
  assert text[2] == "hello"
  silent = io.StringIO()
  Progress(2, stream=silent, enabled=False).update("x")
  assert silent.getvalue() == ""


def host_trace(seed: int) -> ActivationTrace:
  """Tiny-model routing for 8 servers, 2 requests of 8 tokens each, skewed toward low ids."""
  r = np.random.default_rng(seed)
  t, req = 8 * 2 * 8, 8
  ids = np.argsort(-r.gumbel(size=(t, 2, 8)) + 0.4 * np.arange(8)[::-1], -1)[..., :2]
  request = np.arange(t) // req
  return ActivationTrace(
      expert_ids=ids.astype(np.int32), gate_weights=np.full(ids.shape, 0.5, np.float32),
      server=(request % 8).astype(np.int32), request=request.astype(np.int32),
      position=(np.arange(t) % req).astype(np.int32), step=(request // 8).astype(np.int32),
      model="tiny", num_experts=8, num_servers=8, source="test")


def test_crosscheck_bytes_match_on_host_devices():
  from moe_edge.experiments.crosscheck import crosscheck  # noqa: PLC0415  (imports JAX)
  rows, note = crosscheck(host_trace(1), host_trace(2), model_config("tiny"),
                          ("uniform_ep", "dancemoe"), steps=1, repeats=1)
  assert [r["method"] for r in rows] == ["uniform_ep", "dancemoe"]
  for r in rows:
    assert r["bytes_equal"]  # the dispatch moves exactly the cost model's bytes
    assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
    assert r["ratio"] == pytest.approx(r["measured_ms"] / r["predicted_ms"])
    assert r["predicted_serial_ms"] >= r["predicted_ms"] and r["measured_masked_ms"] > 0
  assert "8 host CPU devices" in note
