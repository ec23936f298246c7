"""Calibration: roofline fit, a short real measurement, JSON round trip, use in the cost model."""
import numpy as np
import pytest
from conftest import REPO

from moe_edge.config import ClusterConfig, ServerSpec, cluster_config, model_config
from moe_edge.cost import (Calibration, CalibrationError, KernelMeasurement, calibrate_local,
                           evaluate, fit_roofline, local_cluster, measure_local,
                           predicted_vs_measured)
from moe_edge.placement.problem import Placement
from moe_edge.workload.traces import ActivationTrace


@pytest.fixture(scope="module")
def measurement():
  """A real (short) measurement of this machine's JAX backend."""
  return measure_local(d_model=64, d_ff=32, token_counts=(1, 4, 64), matmul_size=128,
                       copy_bytes=1 << 20, repeats=3)


def test_fit_roofline_recovers_synthetic_rates():
  w, f = 6e6, 2e6          # weight bytes, FLOPs per token
  bw, flops = 5e11, 1e14   # bytes/s, FLOP/s: ridge at c = w * flops / (f * bw) = 600 tokens
  c = np.array([1, 16, 128, 1024, 4096])
  t = np.maximum(w / bw, c * f / flops)
  got_bw, got_flops = fit_roofline(c, t, w, f)
  assert got_bw == pytest.approx(bw) and got_flops == pytest.approx(flops)
  # Only the bandwidth-bound regime measured: the FLOP rate is a lower bound.
  _, low = fit_roofline(c[:2], t[:2], w, f)
  assert low < flops
  with pytest.raises(CalibrationError):
    fit_roofline([1, 2], [1e-3], w, f)
  with pytest.raises(CalibrationError):
    fit_roofline([1, 2], [1e-3, 0.0], w, f)


def test_measure_local_is_sane(measurement):
  m = measurement
  assert m.matmul_flops > 0 and m.copy_bandwidth > 0
  assert len(m.ffn_seconds) == 3 and all(s > 0 for s in m.ffn_seconds)
  assert len(m.experts_per_call) == 3 and min(m.experts_per_call) >= 1
  bw, flops = m.fitted()
  # The fit is the best of the measured rates, by definition.
  assert bw == pytest.approx(max(m.expert_weight_bytes / s for s in m.ffn_seconds))
  assert flops == pytest.approx(max(c * m.expert_flops_per_token / s
                                    for c, s in zip(m.token_counts, m.ffn_seconds)))
  assert KernelMeasurement.from_dict(m.to_dict()) == m


def test_calibrate_local_without_cluster(measurement, tmp_path):
  cal = calibrate_local(measurement=measurement)
  bw, flops = measurement.fitted()
  assert cal.num_servers == 1
  assert cal.source.startswith(f"measured on {measurement.device_kind} at {measurement.date}")
  np.testing.assert_allclose(cal.flops_efficiency, [flops / measurement.matmul_flops])
  np.testing.assert_allclose(cal.bw_efficiency, [bw / measurement.copy_bandwidth])
  path = cal.save(tmp_path / "cal.json")
  assert Calibration.load(path) == cal
  # It belongs to a cluster of the measured device.
  cal_cluster = local_cluster(measurement, 1)
  cal.check(cal_cluster)
  assert cal_cluster.servers[0].peak_flops == measurement.matmul_flops


def test_calibrate_local_for_one_server_of_a_cluster(measurement, tmp_path):
  cluster = cluster_config("edge_hetero_4")
  cal = calibrate_local(cluster, server_index=1, measurement=measurement,
                        default_flops_efficiency=0.6, default_bw_efficiency=0.8)
  bw, flops = measurement.fitted()
  spec = cluster.servers[1]
  np.testing.assert_allclose(cal.flops_efficiency, [0.6, flops / spec.peak_flops, 0.6, 0.6])
  np.testing.assert_allclose(cal.bw_efficiency, [0.8, bw / spec.mem_bandwidth, 0.8, 0.8])
  assert "measured on" in cal.source and "datasheet for the rest" in cal.source
  assert Calibration.load(cal.save(tmp_path / "c.json")) == cal
  with pytest.raises(CalibrationError, match="server_index"):
    calibrate_local(cluster, server_index=4, measurement=measurement)


def test_calibration_validation(tmp_path):
  cluster = cluster_config("edge_hetero_4")
  with pytest.raises(CalibrationError, match="> 0"):
    Calibration(np.array([1.0, 0.0]), np.ones(2))
  with pytest.raises(CalibrationError, match="same length"):
    Calibration(np.ones(2), np.ones(3))
  with pytest.raises(CalibrationError, match="4"):
    Calibration(np.ones(3), np.ones(3)).check(cluster)
  named = Calibration.datasheet(cluster_config("homogeneous_4"))
  with pytest.raises(CalibrationError, match="servers"):
    named.check(cluster)
  with pytest.raises(CalibrationError, match="no calibration file"):
    Calibration.load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text('{"bw_efficiency": [1.0]}')
  with pytest.raises(CalibrationError, match="flops_efficiency"):
    Calibration.load(tmp_path / "bad.json")


def test_calibration_scales_the_roofline_and_ratio():
  model = model_config("tiny")
  spec = ServerSpec("x", memory_bytes=1e9, peak_flops=1e6, mem_bandwidth=1e6)
  cluster = ClusterConfig("one", (spec,), ((0.0,),), ((0.0,),))
  hosts = np.ones((1, model.n_moe_layers, model.n_experts), bool)
  placement = Placement.from_hosts(hosts, model, cluster)
  # Step 0: 1 token (each expert it picks is weight-read bound: 6144 B / 1e6 B/s > 3072 FLOP /
  # 1e6 FLOP/s); step 1: 50 tokens all on experts 0 and 1 (FLOP bound: 50 * 3072 / 1e6).
  ids = np.zeros((51, model.n_moe_layers, 2), np.int32)
  ids[:, :, 1] = 1
  trace = ActivationTrace(ids, np.ones(ids.shape, np.float32), np.zeros(51, np.int32),
                          np.arange(51, dtype=np.int32), np.zeros(51, np.int32),
                          np.array([0] + [1] * 50, np.int32), "tiny", model.n_experts, 1)
  base = evaluate(trace, model, cluster, placement)
  cal = Calibration(np.array([0.5]), np.array([0.25]), "test")
  slow = evaluate(trace, model, cluster, placement, calibration=cal)
  read, flop = model.expert_bytes / 1e6, model.expert_flops_per_token / 1e6
  np.testing.assert_allclose(base.compute_time, (2 * read + 2 * 50 * flop) / 2)
  np.testing.assert_allclose(slow.compute_time, (2 * read / 0.25 + 2 * 50 * flop / 0.5) / 2)
  assert slow.calibration_source == "test"
  # measured / predicted.
  assert predicted_vs_measured(2 * base.latency, base) == pytest.approx(2.0)
  assert predicted_vs_measured(base.step_latency * 3, base) == pytest.approx(3.0)
  with pytest.raises(CalibrationError, match="one time per step"):
    predicted_vs_measured(np.ones(3), base)
  with pytest.raises(CalibrationError, match="positive"):
    predicted_vs_measured(-1.0, base)


def test_bf16_measurement_fits_without_jax_imported_first():
  """A saved bf16 GPU measurement is usable from a process that never imported JAX."""
  import subprocess
  import sys
  code = ("from moe_edge.cost.calibrate import Calibration;"
          "c = Calibration.load('results/calibration/gpu_olmoe_expert.json');"
          "m = c.measurements[0]; assert m.dtype == 'bfloat16';"
          "print(m.expert_weight_bytes)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert int(out.stdout) == 3 * 2048 * 1024 * 2
