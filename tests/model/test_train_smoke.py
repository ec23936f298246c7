"""experiments/train_small_moe.py end to end on `tiny` (a few CPU steps): resume, interrupted
runs, and the guard on a used --ckpt_dir (issue 14)."""
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from moe_edge.io import cli
from moe_edge.model import checkpoint as ckpt
from moe_edge.workload import corpus
from conftest import REPO, load_script

TIMING = ("tokens_per_sec",)


@pytest.fixture(scope="module")
def script():
  yield load_script("train_small_moe")
  flags.FLAGS.unparse_flags()


def argv(ckpt_dir, *extra):
  return ["train_small_moe.py", "--model=tiny", "--steps=4", "--batch=5", "--seq_len=16",
          "--warmup=1", "--log_every=2", "--save_every=2", "--eval_every=2", "--eval_windows=2",
          "--final_eval_windows=3", f"--ckpt_dir={ckpt_dir}", *extra]


@pytest.fixture(scope="module")
def train_main(script):
  def run(ckpt_dir, *extra):
    code = cli.invoke(script.main, argv(ckpt_dir, *extra))
    assert code == 0
    return json.loads((ckpt_dir / "metrics.json").read_text())
  return run


@pytest.fixture(scope="module")
def full_run(train_main, tmp_path_factory, shared_data):
  full = tmp_path_factory.mktemp("train") / "full"
  return full, train_main(full)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def same_weights(a_dir, b_dir):
  a, _, step_a = ckpt.restore_checkpoint(a_dir)
  b, _, step_b = ckpt.restore_checkpoint(b_dir)
  assert step_a == step_b
  for x, y in zip(leaves(ckpt.params_dict(a)), leaves(ckpt.params_dict(b))):
    np.testing.assert_array_equal(x, y)


def untimed(history):
  return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_train_then_resume_reproduces_the_run(train_main, full_run, tmp_path):
  full, m = full_run
  assert m["steps"] == 4 and m["config"] == "tiny" and m["finished"]
  assert set(m["heldout"]["bits_per_byte"]) == set(corpus.DOMAINS)
  for d, nats in m["heldout"]["nats_per_byte"].items():
    assert np.isclose(m["heldout"]["bits_per_byte"][d], nats / np.log(2))
    assert 0 < nats < 10
  tv = m["expert_tv_between_domains"]
  assert len(tv) == 2 and all(0 <= row["mean"] <= row["max"] <= 1 for row in tv)
  # TV from the reported counts, recomputed here
  counts = {d: np.asarray(c, float) for d, c in m["expert_counts"].items()}
  p = {d: c / c.sum(-1, keepdims=True) for d, c in counts.items()}
  pairs = [0.5 * np.abs(p[a][0] - p[b][0]).sum() for i, a in enumerate(p) for b in list(p)[i + 1:]]
  assert np.isclose(tv[0]["max"], max(pairs)) and np.isclose(tv[0]["mean"], np.mean(pairs))
  assert [s for s, _ in ckpt.list_checkpoints(full)] == [2, 4]
  final_meta = ckpt.read_checkpoint_meta(full / "final")
  assert final_meta["param_dtype"] == "bfloat16" and not final_meta["has_opt_state"]
  manifest = json.loads((full / "manifest.json").read_text())
  assert manifest["status"] == "complete" and manifest["seed"] == 0
  assert manifest["files"] == ["final", "metrics.json", "step_00000002", "step_00000004"]
  assert manifest["config"]["model"]["name"] == "tiny" and manifest["config"]["steps"] == 4
  assert len(manifest["code"]["git_commit"]) == 40 and manifest["packages"]["jax"]


def test_kill_after_a_save_then_interrupted_save_then_resume(script, train_main, full_run,
                                                             tmp_path, monkeypatch, capsys):
  """Ctrl-C at step 3 (after the step-2 save) keeps the pre-kill history in metrics.json; the
  remains of an interrupted step-4 save (old and new layout) do not block --resume, are
  reported and removed; the resumed run equals the uninterrupted one: same data, optimizer
  state and weights, and the history continues the killed run's."""
  full, m = full_run
  run_dir = tmp_path / "run"
  real = script.batch_for_step

  def interrupted(train, seed, step, batch, seq_len):
    if step == 2:
      raise KeyboardInterrupt
    return real(train, seed, step, batch, seq_len)

  monkeypatch.setattr(script, "batch_for_step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    cli.invoke(script.main, argv(run_dir))
  monkeypatch.setattr(script, "batch_for_step", real)
  killed = json.loads((run_dir / "metrics.json").read_text())
  assert not killed["finished"] and killed["steps_done"] == 2
  assert untimed(killed["history"]) == [h for h in untimed(m["history"]) if h["step"] <= 2]
  # an interrupted save of step 4: orbax's temporary params in step_4/, and our partial sibling
  (run_dir / "step_00000004" / "params.orbax-checkpoint-tmp-17").mkdir(parents=True)
  (run_dir / ".step_00000004.partial-0123456789ab" / "params").mkdir(parents=True)
  m2 = train_main(run_dir, "--resume")
  assert "removing what an interrupted save left" in capsys.readouterr().out
  assert m2["resumed_from_step"] == 2 and m2["steps"] == 4
  assert not ckpt.partial_checkpoints(run_dir)
  same_weights(full / "step_00000004", run_dir / "step_00000004")
  assert m2["heldout"]["nats_per_byte"] == pytest.approx(m["heldout"]["nats_per_byte"], rel=1e-6)
  assert untimed(m2["history"]) == untimed(m["history"])


def test_a_second_run_into_a_used_dir_is_refused(script, full_run, capsys):
  """Another seed and fewer steps into a used --ckpt_dir without --resume: refused before any
  work, with the fix, and nothing in the folder changes."""
  full, _ = full_run
  before = {p: p.stat().st_mtime_ns for p in full.rglob("*")}
  capsys.readouterr()
  for extra, fragment in ((["--seed=1", "--steps=3"], "seed: 0 vs 1; steps: 4 vs 3"),
                          ([], "the same settings"),
                          (["--seed=1", "--resume"], "--resume: .* with different settings: seed"),
                          (["--resume", "--overwrite"], "contradict")):
    code = cli.invoke(script.main, argv(full, *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("train_small_moe.py: error: ")
    assert "Traceback" not in err
    assert re.search(fragment, err), err
    assert "--resume" in err or "--overwrite" in err
  assert {p: p.stat().st_mtime_ns for p in full.rglob("*")} == before


def test_the_shipped_model_folder_is_refused(script, tmp_path, capsys):
  """The default --ckpt_dir holds the shipped model (no manifest): a run into it is refused."""
  copy = tmp_path / "small_moe"
  shutil.copytree(REPO / "checkpoints" / "small_moe", copy)
  before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
  code = cli.invoke(script.main, argv(copy))
  err = capsys.readouterr().err
  assert code == 2
  assert "already holds final, metrics.json" in err and "--overwrite" in err
  assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
