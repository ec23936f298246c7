"""experiments/bench_dispatch.py --small on 2 CPU devices (a subprocess; the script creates the
host devices): every configuration runs, computes the same outputs, counts its traffic like the
host does, and writes the table and the JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_dispatch_small_on_cpu(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "bench_dispatch.py"), "--small",
       "--num_devices", "2", "--models", "mixtral_8x7b", "--out", str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  s = json.loads((tmp_path / "bench_dispatch.json").read_text())
  assert s["complete"] and s["devices"] == 2 and s["backend"] == "cpu"
  rows = s["rows"]
  assert {(r["phase"], r["method"], r["transport"]) for r in rows} == {
      (p, m, "padded") for p in ("decode", "prefill") for m in ("dancemoe", "uniform_ep",
                                                                "maxtext")}
  assert all(a["ok"] for a in s["agreement"]) and len(s["agreement"]) == 2
  for r in rows:
    assert r["median_ms"] > 0 and r["roofline_ms"] > 0 and 0 < r["roofline_fraction"]
    assert r["wire_mb"] >= r["real_mb"] > 0  # padded buffers carry at least the real rows
    assert r["stats_match_host"] is (None if r["method"] == "maxtext" else True)
    assert r["vs_maxtext"] > 0
  by = {(r["phase"], r["method"]): r for r in rows}
  for phase in ("decode", "prefill"):  # E = 8 over 2 devices: 4 each, DanceMoE 6 with replicas
    assert by[phase, "uniform_ep"]["experts_per_device"] == [4, 4]
    assert by[phase, "dancemoe"]["experts_per_device"] == [6, 6]
    assert by[phase, "dancemoe"]["coverage"] > by[phase, "uniform_ep"]["coverage"]
  assert s["slicing"]["stacked"]["temp_mb"] is not None
  md = (tmp_path / "bench_dispatch.md").read_text()
  assert "| model | phase |" in md and "Outputs of all configurations agree: yes" in md
