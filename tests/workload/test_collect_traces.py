"""experiments/collect_traces.py and activation_stats.py end to end (small sizes)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_edge.config import model_config
from moe_edge.workload.traces import ActivationTrace

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args):
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_stats_source_and_activation_stats(tmp_path):
  out = tmp_path / "olmoe.npz"
  res = _run("collect_traces.py", "--source=stats", "--stats_model=olmoe_1b_7b",
             "--num_servers=3", "--requests_per_server=4", "--seq_len=64", "--alpha=0.9",
             "--drift=2:c4,book,github", f"--out={out}")
  assert res.returncode == 0, res.stderr
  tr = ActivationTrace.load(out)
  cfg = model_config("olmoe_1b_7b")
  tr.check_matches(cfg.n_moe_layers, cfg.n_experts, cfg.top_k, 3)
  assert tr.num_tokens == 3 * 4 * 64 and "2:c4,book,github" in tr.note
  assert f"wrote {out}" in res.stdout and "own-hot" in res.stdout
  res = _run("activation_stats.py", f"--trace={out}", "--real_stats")
  assert res.returncode == 0, res.stderr
  assert "mixtral_8x7b" in res.stdout and str(out) in res.stdout


def test_corpus_source_random_init_tiny(tmp_path):
  pytest.importorskip("moe_edge.model.transformer")
  out = tmp_path / "tiny.npz"
  res = _run("collect_traces.py", "--model_config=tiny", "--checkpoint=none", "--num_servers=2",
             "--requests_per_server=3", "--seq_len=32", "--batch_size=4", f"--out={out}")
  assert res.returncode == 0, res.stderr
  tr = ActivationTrace.load(out)
  cfg = model_config("tiny")
  tr.check_matches(cfg.n_moe_layers, cfg.n_experts, cfg.top_k, 2)
  assert tr.num_tokens == 2 * 3 * 32
  assert np.array_equal(np.bincount(tr.server), [96, 96])


def test_missing_checkpoint_is_explained(tmp_path):
  res = _run("collect_traces.py", "--model_config=tiny", f"--checkpoint={tmp_path / 'none_here'}",
             f"--out={tmp_path / 'x.npz'}")
  assert res.returncode != 0
  assert "--checkpoint none" in res.stderr + res.stdout
