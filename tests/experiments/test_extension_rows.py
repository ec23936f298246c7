"""Extension rows of the tables and the extensions sweep: fewer bytes, identity at tau = 0."""
import numpy as np
import pytest

from moe_edge.experiments import extension_rows as ext
from moe_edge.experiments.config import ExperimentConfig, with_overrides
from moe_edge.experiments.sweeps import run_sweep
from moe_edge.experiments.tables import compute_rows, format_markdown

METRICS = ("decode_ms", "prefill_ms", "cross_kb_per_token", "coverage", "decode_ms_datasheet")

STATS = ExperimentConfig(
    name="test_ext_stats", models=("mixtral_8x7b",), clusters=("edge_hetero_4",),
    methods=("dancemoe", "uniform_ep"), tokens_per_server=256, request_len=64, trace_cache="",
    decode_batch=4, extension_rows=True, substitution_threshold=0.3)
SMALL = ExperimentConfig(
    name="test_ext_small", models=("small_moe",), clusters=("edge_hetero_4",),
    methods=("dancemoe",), small_requests_per_server=4, small_seq_len=64, trace_cache="",
    profile_seed_offset=1, decode_batch=2, extension_rows=True, substitution_threshold=0.3,
    budget_remote_choices=1.0, extension_calib_requests=2, sweep_cluster="edge_hetero_4",
    extension_thresholds=(0.0, 0.3))


def _by(rows):
  return {r["method"]: r for r in rows}


def _same_metrics(a, b):
  for k in METRICS:
    assert a[k] == pytest.approx(b[k], rel=1e-12, abs=0), k


def test_extension_rows_are_off_by_default():
  assert not ExperimentConfig(name="x").extension_rows


def test_drop_rows_of_statistics_models(shared_data):
  rows = _by(compute_rows(STATS)[0])
  assert set(rows) == {"dancemoe", "uniform_ep", ext.drop_label(0.3)}
  dm, drop = rows["dancemoe"], rows[ext.drop_label(0.3)]
  assert drop["cross_kb_per_token"] < dm["cross_kb_per_token"]
  assert drop["coverage"] > dm["coverage"]
  assert drop["delta_nll"] == ext.NO_WEIGHTS
  zero = _by(compute_rows(with_overrides(STATS, substitution_threshold=0.0))[0])
  _same_metrics(zero[ext.drop_label(0.0)], zero["dancemoe"])
  md = format_markdown(STATS, list(rows.values()))
  assert "n/a (no weights)" in md and "Only small_moe has real weights" in md


@pytest.fixture(scope="module")
def small_rows(shared_data):
  return compute_rows(SMALL)[0], compute_rows(with_overrides(
      SMALL, substitution_threshold=0.0, budget_remote_choices=1e9))[0]


def test_small_model_rows(small_rows):
  rows, zero = (_by(r) for r in small_rows)
  dm = rows["dancemoe"]
  for label in (ext.subst_label(0.3), ext.budget_label(1.0)):
    r = rows[label]
    assert r["cross_kb_per_token"] <= dm["cross_kb_per_token"] + 1e-12
    assert r["coverage"] >= dm["coverage"]
    assert isinstance(r["delta_nll"], float) and np.isfinite(r["delta_nll"])
  assert rows[ext.subst_label(0.3)]["cross_kb_per_token"] < dm["cross_kb_per_token"]
  # tau = 0 substitutes nothing; an unbounded budget keeps every choice: the plain row, no loss
  for label in (ext.subst_label(0.0), ext.budget_label(1e9)):
    _same_metrics(zero[label], zero["dancemoe"])
    assert zero[label]["delta_nll"] == 0.0


def test_substituted_trace_against_numpy(shared_data):
  from moe_edge.experiments.workloads import small_trace
  trace = small_trace(SMALL, 4, SMALL.seed)
  rng = np.random.default_rng(0)
  hosts = rng.random((4, trace.expert_ids.shape[1], 16)) < 0.4
  sim = rng.uniform(-1, 1, (trace.expert_ids.shape[1], 16, 16)).astype(np.float32)
  new = ext.substituted_trace(trace, hosts, sim, 0.3)
  local = lambda ids: hosts[trace.server[:, None, None], np.arange(ids.shape[1])[None, :, None],
                            ids]
  old_local, new_local = local(trace.expert_ids), local(new.expert_ids)
  changed = new.expert_ids != trace.expert_ids
  assert changed.any()
  # only remote low-gate choices change, always to a local expert, gates inherited
  assert np.all(~old_local[changed] & (trace.gate_weights[changed] < 0.3) & new_local[changed])
  np.testing.assert_array_equal(new.gate_weights, np.maximum(trace.gate_weights, 0))
  # a remote low-gate choice stays remote only if no unused local expert was left
  stay = ~old_local & (trace.gate_weights < 0.3) & ~changed
  for t, l, r in zip(*np.nonzero(stay)):
    free = hosts[trace.server[t], l].copy()
    free[new.expert_ids[t, l]] = False
    assert not free.any()
  dropped = ext.dropped_trace(trace, hosts, 0.3)
  gone = ~old_local & (trace.gate_weights < 0.3)
  assert np.all(dropped.gate_weights[gone] == 0)
  np.testing.assert_array_equal(dropped.gate_weights[~gone], trace.gate_weights[~gone])


def test_extensions_sweep(small_rows):
  rows = run_sweep(SMALL, "extensions")
  assert [(r["method"], r["x"]) for r in rows] == [("subst", 0.0), ("drop", 0.0),
                                                    ("subst", 0.3), ("drop", 0.3)]
  for r in rows:
    assert r["bytes_saved"] >= -1e-12
    if r["x"] == 0:
      assert r["bytes_saved"] == 0.0 and r["delta_nll"] == 0.0 and r["latency_ratio"] == 1.0
  assert all(r["bytes_saved"] > 0 for r in rows if r["x"] > 0)
