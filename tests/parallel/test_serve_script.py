"""experiments/serve.py end to end in a subprocess: tiny model, random init, 4 CPU devices (the
script sets the device count itself), a DanceMoE placement, Poisson arrivals, a live migration to
uniform EP during serving; the output folder holds the metrics schema."""
import csv
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
  out = tmp_path / "serve"
  proc = _run(["--model_config", "tiny", "--checkpoint", "none", "--cluster", "edge_hetero_4",
               "--requests_per_server", "3", "--rate", "50", "--prompt_len", "4,20",
               "--max_new_tokens", "2,6", "--prefill_chunk", "8", "--max_batch", "2",
               "--profile_requests", "1", "--migrate_to", "uniform_ep", "--migrate_at_step", "2",
               "--clock", "virtual", "--noprogress", "--out", str(out)], tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.strip().endswith("PASS")
  s = json.loads((out / "summary.json").read_text())
  assert s["kv_cache"] is True and s["equal_to_single_device"] is True
  assert s["bytes_equal_cost_model"] is True and s["cross_bytes_per_token"] > 0
  assert s["servers"] == 4 and s["devices"].startswith("4 x ") and s["requests"] == 12
  assert s["migration"]["to"] == "uniform_ep" and s["migration"]["copies"] > 0
  for key in ("ttft_ms", "tpot_ms", "latency_ms"):
    assert s[key]["p50"] <= s[key]["p99"] and s[key]["mean"] > 0
  with (out / "requests.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12 and sum(int(r["output_tokens"]) for r in rows) == s["tokens_generated"]
  for r in rows:
    assert float(r["arrival_s"]) <= float(r["first_token_s"]) <= float(r["finish_s"])
  with (out / "steps.csv").open() as f:
    steps = list(csv.DictReader(f))
  assert len(steps) == s["steps"]
  assert sum(int(r["cross_bytes"]) for r in steps) == s["cross_bytes"]
  assert "TTFT" in proc.stdout
  assert "tokens equal to the single-device cached model: yes" in proc.stdout


def test_serve_refuses_bad_input(tmp_path):
  proc = _run(["--model_config", "tiny", "--checkpoint", "none", "--transport", "ragged"],
              tmp_path, timeout=120)
  assert proc.returncode != 0
  assert "ragged needs a GPU" in proc.stderr + proc.stdout
  proc = _run(["--model_config", "tiny", "--checkpoint", "none", "--prompt_len", "60",
               "--max_new_tokens", "10", "--profile_requests", "1", "--noprogress"], tmp_path,
              timeout=120)
  assert proc.returncode != 0
  assert "exceeds the model's context of 64" in proc.stderr + proc.stdout
  assert "Traceback" not in proc.stderr
