"""experiments/migration.py end to end on a short drifting OLMoE-statistics workload."""
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_migration_script_writes_csv_plot_and_summary(tmp_path, shared_data):
  out = tmp_path / "mig"
  max_moves = 6
  cmd = [sys.executable, str(REPO / "experiments" / "migration.py"), "--steps", "12",
         "--interval", "3", "--request_len", "16", "--max_moves", str(max_moves),
         "--drift", "6:book,arxiv,github,c4", "--fail_server", "2", "--fail_step", "7",
         "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu",
                            "PATH": "/usr/bin:/bin"})
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Failure drill" in res.stdout and "shift at step 6" in res.stdout

  with open(out / "intervals.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 4                     # three policies x 12 / 3 intervals
  by = {p: [r for r in rows if r["policy"] == p] for p in ("none", "full", "incremental")}
  assert all(int(r["moves"]) == 0 for r in by["none"])
  assert all(int(r["moves"]) <= max_moves for r in by["incremental"])
  for r in rows:
    assert 0.0 <= float(r["coverage"]) <= 1.0 and float(r["latency_ms"]) > 0
  assert (out / "migration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  summary = json.loads((out / "summary.json").read_text())
  assert summary["shifts"] == [6]
  moves = {p: sum(int(r["moves"]) for r in by[p]) for p in by}
  for p in by:
    assert summary["policies"][p]["total_moves"] == moves[p]
  fail = summary["failure"]
  assert fail["server"] == 2 and fail["reloads"] == fail["orphans"]
  assert fail["unreachable_during_recovery"] == fail["orphans"]


def test_recovery_bounds_from_both_starting_placements(tmp_path, shared_data):
  """Both lower bounds are reported and each is no larger than the copies that did recover."""
  out = tmp_path / "mig"
  cmd = [sys.executable, str(REPO / "experiments" / "migration.py"), "--steps", "12",
         "--interval", "3", "--request_len", "16", "--max_moves", "40",
         "--drift", "3:book,arxiv,github,c4", "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu",
                            "PATH": "/usr/bin:/bin"})
  assert res.returncode == 0, res.stderr[-3000:]
  (rec,) = json.loads((out / "summary.json").read_text())["recovery"]
  assert "from the re-plan policy's placement before the shift" in res.stdout
  for key in ("min_copies_any_plan", "min_copies_from_replan_state"):
    assert rec[key] is None or rec[key] >= 0
  if rec["intervals_to_recover"] is not None and rec["intervals_to_recover"] <= 2:
    assert rec["min_copies_any_plan"] <= rec["incremental_moves"]


def test_migration_sweep_collects_every_run(tmp_path, shared_data):
  """experiments/migration_sweep.py: one row per run and shift, consistent with each run's own
  summary.json, and a summary table row per (drift, shift, policy)."""
  out = tmp_path / "sweep"
  cmd = [sys.executable, str(REPO / "experiments" / "migration_sweep.py"), "--seeds", "0",
         "--drift_presets", "pairs,mix", "--budgets", "6:1", "--prefix_steps", "0,2",
         "--extra=--steps=18,--interval=3,--request_len=16", "--keep_runs",
         "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu",
                            "PATH": "/usr/bin:/bin"})
  assert res.returncode == 0, res.stderr[-3000:]
  with open(out / "shifts.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 2 * 2  # drifts x trigger settings x shifts
  for r in rows:
    run = out / "runs" / f"{r['drift']}_b6h1_p{r['prefix_step']}_s0"
    rec = json.loads((run / "summary.json").read_text())["recovery"][int(r["shift"]) - 1]
    assert int(r["incremental_moves"]) == rec["incremental_moves"]
    assert int(r["full_replan_moves"]) == rec["full_replan_moves"]
    t = rec["intervals_to_recover"]
    met = (t is not None and t <= 2 and rec["move_share"] is not None
           and rec["move_share"] <= 0.25)
    assert r["goal_met"] == str(met)
    with open(run / "intervals.csv") as f:
      inc = [x for x in csv.DictReader(f) if x["policy"] == "incremental"]
    assert all(int(x["moves"]) <= 6 for x in inc)
  table = (out / "summary.md").read_text()
  for drift in ("pairs", "mix"):
    for shift in (1, 2):
      for trig in ("all-or-nothing", "prefix"):
        assert f"| {drift} | {shift} | 6 x 1, {trig} |" in table
