"""experiments/migration.py end to end on a short drifting OLMoE-statistics workload."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from moe_edge.config import ConfigError
from moe_edge.experiments.migration_run import MigrationRun

REPO = Path(__file__).resolve().parents[2]


def test_migration_script_writes_csv_plot_and_summary(tmp_path, shared_data):
  out = tmp_path / "mig"
  max_moves = 6
  cmd = [sys.executable, str(REPO / "experiments" / "migration.py"), "--config.steps=12",
         "--config.interval=3", "--config.request_len=16", f"--config.max_moves={max_moves}",
         "--config.drift=6:book,arxiv,github,c4", "--config.fail_server=2",
         "--config.fail_step=7", "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                            "PATH": "/usr/bin:/bin"})
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Failure drill" in res.stdout and "shift at step 6" in res.stdout

  with open(out / "intervals.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 4                     # three policies x 12 / 3 intervals
  by = {p: [r for r in rows if r["policy"] == p] for p in ("none", "full_replan", "incremental")}
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
  cmd = [sys.executable, str(REPO / "experiments" / "migration.py"), "--config.steps=12",
         "--config.interval=3", "--config.request_len=16", "--config.max_moves=40",
         "--config.drift=3:book,arxiv,github,c4", "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
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
  cmd = [sys.executable, str(REPO / "experiments" / "migration_sweep.py"), "--config.seeds=0",
         "--config.drift_presets=pairs", "--config.drift_presets=mix", "--config.budgets=6:1",
         "--config.prefix_steps=0,2",
         "--config.run.steps=18", "--config.run.interval=3", "--config.run.request_len=16",
         "--config.keep_runs=True", "--out", str(out)]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={"MOE_EDGE_DATA": str(shared_data), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
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


@pytest.mark.parametrize("args, message", [
    (["--config.colour=red"], "--config.colour: no such setting"),        # unknown key
    (["--config.alpha=1.5"], "alpha must lie in [0, 1]"),                # invalid value
])
def test_bad_settings_fail_in_one_line(tmp_path, args, message):
  res = subprocess.run([sys.executable, str(REPO / "experiments" / "migration.py"), *args,
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                                         "PATH": "/usr/bin:/bin"})
  assert res.returncode != 0
  lines = [x for x in res.stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
  assert not list(tmp_path.iterdir())


def _parse(*overrides):
  """The migration preset with ``overrides`` applied by ml_collections, as the script does."""
  fv, argv = flags.FlagValues(), ["prog", *overrides]
  saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides off sys.argv
  try:
    holder = config_flags.DEFINE_config_file(
        "config", str(REPO / "configs" / "experiments" / "migration.py"), flag_values=fv,
        lock_config=True)
    fv(argv)
  finally:
    sys.argv = saved
  return holder.value.to_dict()


def test_overrides_build_the_frozen_config():
  run = MigrationRun.from_flat(_parse("--config.max_moves=96", "--config.copies=2",
                                      "--config.policies=none", "--config.policies=incremental",
                                      "--config.max_mb=500"))
  assert run.migration.max_moves == 96 and run.copies == 2.0 and run.migration.max_mb == 500
  assert run.migration.policies == ("none", "incremental") and run.migration.seed == run.seed
  assert MigrationRun.from_flat(_parse()) == MigrationRun()  # the preset = the defaults
  with pytest.raises(flags.IllegalFlagValueError, match="steps"):  # wrong type
    _parse("--config.steps=many")
  with pytest.raises(ConfigError, match="policies"):
    MigrationRun.from_flat(_parse("--config.policies=none", "--config.policies=sometimes"))
  with pytest.raises(ConfigError, match="prefix_step must be an integer >= 0"):
    MigrationRun.from_flat(_parse("--config.prefix_step=-1"))
  with pytest.raises(ConfigError, match="unknown migration settings"):
    MigrationRun.from_flat(dict(_parse(), colour="red"))
  with pytest.raises(ConfigError, match="drift_preset"):
    MigrationRun.from_flat(_parse("--config.drift_preset=sideways"))
