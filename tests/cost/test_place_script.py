"""experiments/place.py end to end: every method places, saves and is costed consistently."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.cost import decode_batches, evaluate, prefill_batches
from moe_edge.placement import registry
from moe_edge.placement.problem import Placement, PlacementProblem
from moe_edge.workload.traces import ActivationTrace
from conftest import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "place.py"


def load_place():
  return load_script("place")


def skewed_trace(model, num_servers, requests, req_len, seed=0):
  """Server n prefers experts near 2n (so locality pays), requests of ``req_len`` tokens."""
  rng = np.random.default_rng(seed)
  l, e, k = model.n_moe_layers, model.n_experts, model.top_k
  t = num_servers * requests * req_len
  server = np.repeat(np.arange(num_servers * requests) % num_servers, req_len)
  logits = -0.5 * ((np.arange(e)[None, :] - 2 * server[:, None]) % e) + rng.gumbel(
      size=(t, e))
  ids = np.argsort(-logits[:, None, :] + rng.gumbel(size=(t, l, e)), axis=-1)[..., :k]
  return ActivationTrace(
      expert_ids=ids.astype(np.int32), gate_weights=np.full(ids.shape, 1 / k, np.float32),
      server=server.astype(np.int32),
      request=np.repeat(np.arange(num_servers * requests), req_len).astype(np.int32),
      position=np.tile(np.arange(req_len), num_servers * requests).astype(np.int32),
      step=np.repeat(np.arange(num_servers * requests) // num_servers, req_len).astype(np.int32),
      model=model.name, num_experts=e, num_servers=num_servers, source="test")


def test_run_methods_saves_and_costs_every_method(tmp_path):
  place = load_place()
  model = model_config("tiny")
  cluster = with_expert_memory(cluster_config("edge_hetero_4"), model, 1.5)
  trace = skewed_trace(model, 4, requests=6, req_len=5)
  methods = place.method_names("all")
  assert methods == registry.names() and "ilp" in methods
  assert "ilp" not in place.method_names("") and "best_known" not in place.method_names("")
  assert "latency_search" in place.method_names("")
  with pytest.raises(ValueError, match="unknown placement method"):
    place.method_names("dancemoe,nonsense")
  rows = place.run_methods(trace, model, cluster, methods, tmp_path, decode_batch=2,
                           prefill_requests=1)
  assert [r["method"] for r in rows] == methods
  # Planned on the first half of the steps, costed on the second half.
  profile, evaluation = trace.select(trace.step < 3), trace.select(trace.step >= 3)
  decode, prefill = decode_batches(evaluation, 2), prefill_batches(evaluation, 1)
  for row in rows:
    assert "error" not in row, row
    placement = Placement.load(tmp_path / f"{row['method']}.json")
    dec = evaluate(decode, model, cluster, placement, "decode")
    pre = evaluate(prefill, model, cluster, placement, "prefill")
    assert row["decode_ms"] == pytest.approx(1e3 * dec.latency)
    assert row["prefill_ms"] == pytest.approx(1e3 * pre.latency)
    assert row["coverage"] == pytest.approx(dec.coverage) and row["fits"]
    assert row["decode_cross_mb_per_step"] == pytest.approx(dec.cross_bytes_per_step / 1e3 / 1e3)
    # The proven bound is below every placement; best_known is the reference of the gaps.
    assert row["gap_to_bound"] >= -1e-9 and row["request_ms"] > 0
  by = {r["method"]: r for r in rows}
  assert by["best_known"]["gap_to_best_known"] == 0.0
  assert by["latency_search"]["gap_to_best_known"] >= -1e-9
  assert "lower bound of the planned request latency" in place.format_table(rows)
  problem = PlacementProblem.from_trace(profile, model, cluster)
  assert problem.freq.shape == (4, model.n_moe_layers, model.n_experts)
  ref = registry.place("uniform_ep", problem)
  np.testing.assert_array_equal(Placement.load(tmp_path / "uniform_ep.json").hosts, ref.hosts)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["model"] == "tiny" and len(summary["rows"]) == len(methods)
  # Locality-aware placement keeps more choices local than plain expert parallelism.
  assert by["dancemoe"]["coverage"] > by["uniform_ep"]["coverage"]
  table = place.format_table(rows)
  assert all(m in table for m in methods)


def test_command_line_with_stats_trace(tmp_path, shared_data):
  env = dict(os.environ, MOE_EDGE_DATA=str(shared_data), JAX_PLATFORMS="cpu")
  out = tmp_path / "placements"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--stats", "mixtral_8x7b", "--cluster", "edge_hetero_4",
       "--copies", "1.5", "--tokens_per_server", "256", "--alpha", "0.9",
       "--methods", "uniform_ep,dancemoe", "--out", str(out), "--decode_batch", "2"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "uniform_ep" in proc.stdout and "dancemoe" in proc.stdout
  assert "decode ms/tok" in proc.stdout
  for m in ("uniform_ep", "dancemoe"):
    assert Placement.load(out / f"{m}.json").hosts.shape == (4, 32, 8)
  bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
  assert bad.returncode != 0 and "exactly one of --trace" in bad.stderr


def test_one_step_trace_is_refused_in_one_line(tmp_path, shared_data):
  """Planning and costing need two halves of the trace's steps: one request per server is
  refused with the fix, not a traceback."""
  env = dict(os.environ, MOE_EDGE_DATA=str(shared_data), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--stats", "mixtral_8x7b", "--tokens_per_server", "64",
       "--methods", "uniform_ep", "--out", str(tmp_path / "p")],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode != 0 and "at least two steps" in proc.stderr
  assert "Traceback" not in proc.stderr
