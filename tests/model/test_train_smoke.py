"""experiments/train_small_moe.py end to end on `tiny` (a few CPU steps), including resume."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from moe_edge.model import checkpoint as ckpt
from moe_edge.workload import corpus
from conftest import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_main():
  module = load_script("train_small_moe")

  def run(ckpt_dir, *extra):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train_small_moe", "--config=tiny", "--steps=4", "--batch=5", "--seq_len=16",
                 "--warmup=1", "--log_every=2", "--save_every=2", "--eval_every=2",
                 "--eval_windows=2", "--final_eval_windows=3", f"--ckpt_dir={ckpt_dir}", *extra])
    module.main([])
    return json.loads((ckpt_dir / "metrics.json").read_text())

  yield run
  flags.FLAGS.unparse_flags()


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_train_then_resume_reproduces_the_run(train_main, tmp_path, shared_data):
  full = tmp_path / "full"
  m = train_main(full)
  assert m["steps"] == 4 and m["config"] == "tiny"
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

  # resume from step 2 in a fresh directory: same data, same optimizer state -> same weights
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  shutil.copytree(full / "step_00000002", resumed / "step_00000002")
  m2 = train_main(resumed, "--resume")
  assert m2["resumed_from_step"] == 2 and m2["steps"] == 4
  a, _, step_a = ckpt.restore_checkpoint(full / "step_00000004")
  b, _, step_b = ckpt.restore_checkpoint(resumed / "step_00000004")
  assert step_a == step_b == 4
  for x, y in zip(leaves(ckpt.params_dict(a)), leaves(ckpt.params_dict(b))):
    np.testing.assert_array_equal(x, y)
  assert m2["heldout"]["nats_per_byte"] == pytest.approx(m["heldout"]["nats_per_byte"], rel=1e-6)
