"""experiments/serve.py end to end in a subprocess: tiny model, random init, 4 CPU devices (the
script sets the device count itself), a DanceMoE placement and a live migration to uniform EP."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, timeout=240):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets it
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(REPO / "experiments" / "serve.py"), *args],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_serve_tiny_on_four_cpu_devices(tmp_path):
  out = tmp_path / "serve.json"
  proc = _run(["--model_config", "tiny", "--checkpoint", "none", "--cluster", "edge_hetero_4",
               "--requests_per_server", "2", "--prompt_len", "8", "--max_new_tokens", "3",
               "--profile_requests", "1", "--migrate_to", "uniform_ep", "--out", str(out)],
              tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.strip().endswith("PASS")
  s = json.loads(out.read_text())
  assert s["servers"] == 4 and s["devices"].startswith("4 x ")
  assert s["tokens_equal"] == {"static": True, "migration": True}
  for name, c in s["checks"].items():  # before and after the migration
    assert c["max_logit_diff"] <= 1e-4 * c["logit_scale"], name
    assert c["cross_bytes"] == c["cost_model_cross_bytes"] > 0, name
    assert abs(c["coverage"] - c["cost_model_coverage"]) < 1e-12, name
  assert s["checks"]["static"]["placement"] == "dancemoe"
  assert s["checks"]["migration"]["placement"] == "uniform_ep"
  assert s["tokens_per_s"] > 0 and s["single_device_tokens_per_s"] > 0
  m = s["migration"]
  assert m["copies"] == m["planner_copies"] > 0
  assert m["wire_bytes"] == m["link_bytes"] > 0
  assert "live migration to uniform_ep" in proc.stdout


def test_serve_refuses_ragged_on_cpu(tmp_path):
  proc = _run(["--model_config", "tiny", "--checkpoint", "none", "--transport", "ragged"],
              tmp_path, timeout=120)
  assert proc.returncode != 0
  assert "ragged needs a GPU" in proc.stderr + proc.stdout
