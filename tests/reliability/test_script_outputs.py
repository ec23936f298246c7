"""The scripts' output folders (issue 14): a second place.py with another workload is refused
instead of mixing its placements with the first one's; the same run replaces its own files and
drops the ones it no longer writes; a failed migration.py never leaves a new CSV beside an old
summary.json."""
from __future__ import annotations

import json

import pytest

from conftest import load_script
from moe_edge.experiments import migration_report as report
from moe_edge.experiments.migration_run import MigrationRun, run_migration
from moe_edge.io import OutputFolder, RunIdentity, cli


def _place(out, *flags):
  module = load_script("place")
  return cli.invoke(module.main, ["place.py", "--tokens_per_server=256", "--decode_batch=2",
                                  "--phase=decode", "--copies=1.5", f"--out={out}", *flags])


def test_second_place_run_is_refused_not_mixed(tmp_path, shared_data, capsys):
  out = tmp_path / "placements"
  assert _place(out, "--stats=olmoe_1b_7b", "--methods=uniform_ep,random") == 0
  first = {p.name: p.read_bytes() for p in out.iterdir()}
  assert {"uniform_ep.json", "random.json", "summary.json", "manifest.json"} <= set(first)

  capsys.readouterr()
  assert _place(out, "--stats=mixtral_8x7b", "--methods=uniform_ep") == cli.USAGE_EXIT
  err = capsys.readouterr().err
  assert "holds the results of another run" in err and "mixtral_8x7b" in err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing touched

  # The same run again replaces its own files; with fewer methods the stale one goes.
  assert _place(out, "--stats=olmoe_1b_7b", "--methods=uniform_ep,random") == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(first)
  # Another workload with --overwrite: the first run's placements are gone, none is mixed in.
  assert _place(out, "--stats=mixtral_8x7b", "--methods=uniform_ep", "--overwrite") == 0
  assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "summary.json",
                                                   "uniform_ep.json"]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["status"] == "complete" and manifest["config"]["stats"] == "mixtral_8x7b"
  assert manifest["files"] == ["summary.json", "uniform_ep.json"]


@pytest.fixture(scope="module")
def small_result(shared_data):
  run = MigrationRun.from_flat(dict(steps=12, interval=3, request_len=8, max_moves=40,
                                    drift="6:book,arxiv,github,c4"))
  return run, run_migration(run)


def _claim(folder, run):
  return OutputFolder.claim(folder, RunIdentity("migration", run.to_flat(), run.seed),
                            report.OUTPUTS)


def test_failed_migration_leaves_the_old_set_whole(tmp_path, small_result):
  run, result = small_result
  out = _claim(tmp_path, run)
  report.write_outputs(result, out)
  out.finish()
  old = {n: (tmp_path / n).read_bytes() for n in report.OUTPUTS}

  # A rerun whose results cannot be rendered (a value JSON cannot hold) writes nothing.
  broken = type(result)(**{**result.__dict__, "summary": {**result.summary, "bad": {1, 2}}})
  out = _claim(tmp_path, run)
  with pytest.raises(TypeError):
    report.write_outputs(broken, out)
  assert {n: (tmp_path / n).read_bytes() for n in report.OUTPUTS} == old

  # A rerun without the plot: the old plot is removed before the new CSV appears.
  out = _claim(tmp_path, run)
  report.write_outputs(result, out, with_plot=False)
  out.finish()
  assert not (tmp_path / "migration.png").exists()
  assert (tmp_path / "intervals.csv").read_bytes() == old["intervals.csv"]
  assert json.loads((tmp_path / "manifest.json").read_text())["files"] == ["intervals.csv",
                                                                          "summary.json"]
