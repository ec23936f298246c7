"""moe_edge.io: atomic writes, run manifests and output-folder ownership, the CLI helper."""
import json
import sys

import pytest
from absl import app, flags

from moe_edge.core.errors import MoeEdgeError
from moe_edge.io import OutputError, OutputFolder, RunIdentity, atomic, cli

OUTS = ("*.csv", "summary.json", "plots")


def ident(alpha=0.8, seed=0, script="place"):
  return RunIdentity(script, {"alpha": alpha, "methods": ("a", "b")}, seed)


# ---- atomic writes ---------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
  path = tmp_path / "summary.json"
  atomic.write_json(path, {"v": 1})
  with pytest.raises(TypeError):
    atomic.write_json(path, {"v": object()})
  with pytest.raises(RuntimeError):
    with atomic.atomic_path(path) as tmp:
      tmp.write_text("half")
      raise RuntimeError("killed")
  assert json.loads(path.read_text()) == {"v": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
  d = tmp_path / "final"
  with atomic.atomic_directory(d) as tmp:
    (tmp / "a").write_text("1")
  with pytest.raises(RuntimeError):
    with atomic.atomic_directory(d, replace=True) as tmp:
      (tmp / "a").write_text("2")
      raise RuntimeError("killed")
  assert (d / "a").read_text() == "1" and atomic.partial_siblings(tmp_path) == []
  with pytest.raises(FileExistsError):
    with atomic.atomic_directory(d):
      pass
  with atomic.atomic_directory(d, replace=True) as tmp:
    (tmp / "b").write_text("3")
  assert sorted(p.name for p in d.iterdir()) == ["b"]


# ---- ownership -------------------------------------------------------------------------------
def test_same_identity_replaces_its_files_and_drops_stale_ones(tmp_path):
  out = OutputFolder.claim(tmp_path, ident(), OUTS, command="place --alpha 0.8")
  out.write_text("olmoe.csv", "x")
  out.write_text("mixtral.csv", "y")
  out.finish()
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert m["files"] == ["mixtral.csv", "olmoe.csv"] and m["status"] == "complete"
  assert m["config"] == {"alpha": 0.8, "methods": ["a", "b"]} and m["seed"] == 0
  assert m["packages"]["numpy"] and "git_commit" in m["code"]
  again = OutputFolder.claim(tmp_path, ident(), OUTS)
  again.write_text("olmoe.csv", "x2")
  again.finish()
  assert not (tmp_path / "mixtral.csv").exists()  # stale: not written by the same run again
  assert json.loads((tmp_path / "manifest.json").read_text())["files"] == ["olmoe.csv"]


def test_another_identity_is_refused_unless_overwrite(tmp_path):
  (tmp_path / "README.md").write_text("hand-written")
  (tmp_path / "cache.npz").write_bytes(b"input cache")
  out = OutputFolder.claim(tmp_path, ident(), OUTS)
  out.write_text("olmoe.csv", "x")
  out.finish()
  refused = r"another run .*seed: 0 vs 1; alpha: 0.8 vs 0.5\); choose"
  with pytest.raises(OutputError, match=refused):
    OutputFolder.claim(tmp_path, ident(alpha=0.5, seed=1), OUTS)
  new = OutputFolder.claim(tmp_path, ident(alpha=0.5), OUTS, overwrite=True)
  assert not (tmp_path / "olmoe.csv").exists()  # gone before the new run writes anything
  new.write_text("mixtral.csv", "z")
  new.finish()
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "README.md", "cache.npz", "manifest.json", "mixtral.csv"]


def test_unrecorded_outputs_are_refused_but_other_files_are_not(tmp_path):
  (tmp_path / "README.md").write_text("hand-written")
  OutputFolder.claim(tmp_path, ident(), OUTS).finish()  # README is not an output: accepted
  (tmp_path / "manifest.json").unlink()
  (tmp_path / "old.csv").write_text("from before manifests")
  with pytest.raises(OutputError, match=r"already holds old.csv, not recorded"):
    OutputFolder.claim(tmp_path, ident(), OUTS)
  OutputFolder.claim(tmp_path, ident(), OUTS, overwrite=True)
  assert not (tmp_path / "old.csv").exists() and (tmp_path / "README.md").exists()


def test_folder_errors(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(OutputError, match="is a file"):
    OutputFolder.claim(f, ident(), OUTS)
  with pytest.raises(OutputError, match="cannot write to output folder"):
    OutputFolder.claim(f / "sub", ident(), OUTS)
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "manifest.json").write_text("[1, 2]")
  with pytest.raises(OutputError, match="not a readable run manifest"):
    OutputFolder.claim(tmp_path / "m", ident(), OUTS)
  out = OutputFolder.claim(tmp_path / "ok", ident(), OUTS)
  with pytest.raises(ValueError, match="not among the declared outputs"):
    out.write_text("notes.txt", "x")
  with pytest.raises(RuntimeError):
    with out.atomic_path("plots") as tmp:
      tmp.write_bytes(b"half a png")
      raise RuntimeError("killed")
  assert not (tmp_path / "ok" / "plots").exists() and out.files == []
  with out.atomic_path("plots") as tmp:
    tmp.write_bytes(b"png")
  assert out.files == ["plots"] and (tmp_path / "ok" / "plots").read_bytes() == b"png"


# ---- CLI helper ------------------------------------------------------------------------------
def test_cli_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
  def main(argv):
    kind = argv[1]
    if kind == "moe":
      raise OutputError("the folder\nis taken")
    if kind == "usage":
      raise app.UsageError("--x must be positive")
    if kind == "bug":
      raise KeyError("a bug")
    return None

  assert cli.invoke(main, ["s.py", "moe"]) == 2
  assert capsys.readouterr().err == "s.py: error: the folder is taken\n"
  assert cli.invoke(main, ["s.py", "usage"]) == 2
  assert capsys.readouterr().err == "s.py: error: --x must be positive\n"
  assert cli.invoke(main, ["s.py", "--no_such_flag_anywhere"]) == 2
  assert "s.py: error: Unknown command line flag 'no_such_flag_anywhere'" in \
      capsys.readouterr().err
  with pytest.raises(KeyError):
    cli.invoke(main, ["s.py", "bug"])
  assert cli.invoke(main, ["s.py", "ok"]) == 0
  assert issubclass(OutputError, MoeEdgeError)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(sys.argv[:1])
