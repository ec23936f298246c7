"""Grouped-FFN calibration: datasheet fractions from benchmark rows, nearest shape, bad files."""
import json

import pytest

from moe_edge.config import cluster_config
from moe_edge.cost import ffn_calibration as fc
from moe_edge.experiments.calibration import describe, edge_calibration

PEAKS = dict(hbm_read_bytes_per_s=4.0e12, bf16_matmul_flops=800e12)


def _row(model, d, f, phase, hbm, flop, backend="mosaic"):
  return dict(model=model, d=d, f=f, phase=phase, backend=backend, hbm_fraction=hbm,
              flop_fraction=flop)


BENCH = dict(peaks=PEAKS, rows=[
    _row("a", 2048, 1024, "decode", 0.5, 0.01), _row("a", 2048, 1024, "decode", 0.6, 0.01),
    _row("a", 2048, 1024, "prefill", 0.1, 0.45), _row("a", 2048, 1024, "prefill", 0.2, 0.30),
    _row("a", 2048, 1024, "decode", 0.99, 0.99, backend="lax"),   # other backends ignored
    _row("b", 4096, 14336, "decode", 0.4, 0.01), _row("b", 4096, 14336, "prefill", 0.1, 0.6)])


def test_fractions_of_the_datasheet_from_the_best_rows():
  eff = fc.efficiency_from_bench(BENCH, 2048, 1024)
  assert eff.model == "a" and eff.shape == (2048, 1024)
  assert eff.bandwidth == pytest.approx(0.6 * 4.0e12 / 4.8e12)
  assert eff.flops == pytest.approx(0.45 * 800e12 / 989.4e12)
  # An unmeasured shape takes the nearest measured one in d x f.
  assert fc.efficiency_from_bench(BENCH, 2048, 1408).model == "a"
  assert fc.efficiency_from_bench(BENCH, 4096, 8192).model == "b"


def test_bad_benchmark_files(tmp_path):
  with pytest.raises(fc.FfnCalibrationError, match="no 'mosaic' rows"):
    fc.efficiency_from_bench(dict(peaks=PEAKS, rows=BENCH["rows"][4:5]), 2048, 1024)
  with pytest.raises(fc.FfnCalibrationError, match="needs decode and prefill rows"):
    fc.efficiency_from_bench(dict(peaks=PEAKS, rows=BENCH["rows"][:2]), 2048, 1024)
  with pytest.raises(fc.FfnCalibrationError, match="is missing: run benchmarks"):
    fc.grouped_ffn_efficiency(2048, 1024, root=str(tmp_path))
  (tmp_path / fc.DEFAULT_FILE).parent.mkdir(parents=True)
  (tmp_path / fc.DEFAULT_FILE).write_text(json.dumps(BENCH))
  assert fc.grouped_ffn_efficiency(2048, 1024, root=str(tmp_path)).model == "a"


def test_committed_h200_calibration_reaches_the_cost_model():
  cluster = cluster_config("edge_hetero_8")
  cal = edge_calibration("h200_grouped", cluster, "mixtral_8x7b")
  assert cal.num_servers == cluster.num_servers
  assert 0 < cal.flops_efficiency.min() <= cal.flops_efficiency.max() < 1
  assert 0 < cal.bw_efficiency.min() < 1
  assert "grouped expert FFN" in describe("h200_grouped", ["olmoe_1b_7b"])[0]
