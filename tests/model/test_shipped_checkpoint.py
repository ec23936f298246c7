"""The trained small_moe checkpoint shipped in the repo (saved on a GPU) restores on CPU and is a
trained model: its held-out loss matches the figure recorded in its metrics.json."""
import json

import jax.numpy as jnp
import numpy as np

from moe_edge.config import model_config
from moe_edge.model.checkpoint import restore_checkpoint, verify_checkpoint
from moe_edge.model.transformer import token_losses
from moe_edge.workload import corpus
from conftest import REPO

CKPT = REPO / "checkpoints" / "small_moe"


def test_shipped_checkpoint_restores_and_matches_its_recorded_loss():
  model, opt_state, step = restore_checkpoint(CKPT / "final", model_config("small_moe"))
  metrics = json.loads((CKPT / "metrics.json").read_text())
  assert opt_state is None and step == metrics["steps"]
  heldout = corpus.load_corpus("heldout")
  seq = 256
  rng = np.random.default_rng(0)
  got, want = [], []
  for d, toks in heldout.items():
    starts = rng.integers(0, len(toks) - seq - 1, size=8)
    batch = jnp.asarray(np.stack([toks[s:s + seq + 1] for s in starts]))
    nll, _ = token_losses(model, batch)
    got.append(float(nll.mean()) / np.log(2))
    want.append(metrics["heldout"]["bits_per_byte"][d])
  # 8 random windows per domain vs the recorded 256: the domain mean agrees to sampling noise.
  # An untrained byte model scores ~8 bits/byte, so this cannot pass on a broken checkpoint.
  np.testing.assert_allclose(np.mean(got), np.mean(want), atol=0.25)


def test_shipped_checkpoint_checksums_hold():
  """checksums.json of the shipped checkpoint covers every file and matches it."""
  verify_checkpoint(CKPT / "final")
  listed = set(json.loads((CKPT / "final" / "checksums.json").read_text())["files"])
  on_disk = {p.relative_to(CKPT / "final").as_posix() for p in (CKPT / "final").rglob("*")
             if p.is_file() and p.name != "checksums.json"}
  assert listed == on_disk and len(listed) == 16
