"""Hostile input files for the battery, built from real files (a saved tiny checkpoint, an
exported safetensors file, a saved placement) and then damaged one way each.

``BUILDERS[name](root) -> Path`` writes one hostile input under ``root``; a case line refers to
it as ``{name}``. Builders may use others through ``build(name)``; everything is built at most
once per test session.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
import safetensors.numpy
from flax import nnx

from moe_edge.config import model_config
from moe_edge.core.problem import Placement, slot_table
from moe_edge.io import OutputFolder, RunIdentity, checksums
from moe_edge.model import checkpoint as ckpt
from moe_edge.model.transformer import MoETransformer

REPO = Path(__file__).resolve().parents[2]
BUILDERS: dict[str, Callable[["Hostile", Path], Path]] = {}


def builder(fn):
  BUILDERS[fn.__name__] = fn
  return fn


class Hostile:
  """Lazily built hostile inputs under one session folder."""

  def __init__(self, root: Path):
    self.root = root
    self._built: dict[str, Path] = {}

  def build(self, name: str) -> Path:
    if name not in self._built:
      if name not in BUILDERS:
        raise KeyError(f"no hostile input {name!r}; define it in tests/reliability/hostile.py")
      folder = self.root / name
      folder.mkdir(parents=True)
      self._built[name] = BUILDERS[name](self, folder)
    return self._built[name]


def _copy_ckpt(h: Hostile, dest: Path) -> Path:
  out = dest / "ckpt"
  shutil.copytree(h.build("tiny_ckpt"), out)
  return out


def _largest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ---- checkpoints -----------------------------------------------------------------------------
@builder
def tiny_ckpt(h, d):
  """A valid saved checkpoint of ``tiny`` (the base of the damaged ones)."""
  return ckpt.save_checkpoint(d / "ckpt", MoETransformer(model_config("tiny"), nnx.Rngs(0)),
                              step=3)


@builder
def ckpt_flipped(h, d):
  """32 flipped bytes in the middle of the largest orbax data file."""
  out = _copy_ckpt(h, d)
  f = _largest_file(out / "params")
  raw = bytearray(f.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 32] = bytes(b ^ 0xFF for b in raw[mid:mid + 32])
  f.write_bytes(bytes(raw))
  return out


@builder
def ckpt_truncated(h, d):
  out = _copy_ckpt(h, d)
  f = _largest_file(out / "params")
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  return out


@builder
def ckpt_zero_bytes(h, d):
  out = _copy_ckpt(h, d)
  _largest_file(out / "params").write_bytes(b"")
  return out


@builder
def ckpt_no_params(h, d):
  out = _copy_ckpt(h, d)
  shutil.rmtree(out / "params")
  return out


@builder
def ckpt_no_checksums(h, d):
  out = _copy_ckpt(h, d)
  (out / "checksums.json").unlink()
  return out


@builder
def ckpt_bad_checksums(h, d):
  out = _copy_ckpt(h, d)
  (out / "checksums.json").write_text('{"algorithm": "sha256", "files": [1, 2')
  return out


@builder
def ckpt_meta_not_json(h, d):
  out = _copy_ckpt(h, d)
  (out / "checkpoint.json").write_text("step: 3\n")
  return out


@builder
def ckpt_no_meta(h, d):
  out = _copy_ckpt(h, d)
  (out / "checkpoint.json").unlink()
  return out


def _edit_meta(out: Path, edit, reseal: bool) -> Path:
  meta = json.loads((out / "checkpoint.json").read_text())
  edit(meta)
  (out / "checkpoint.json").write_text(json.dumps(meta, indent=1))  # as save_checkpoint
  if reseal:  # consistent checksums: what another moe-edge version would have written
    checksums.write(out)
  return out


@builder
def ckpt_top_k_edited(h, d):
  """checkpoint.json says top_k 3 for a top-2 model (checksums not updated)."""
  return _edit_meta(_copy_ckpt(h, d), lambda m: m["config"].update(top_k=3), reseal=False)


@builder
def ckpt_future_field(h, d):
  """A stored config field this ModelConfig does not know (checksums consistent)."""
  return _edit_meta(_copy_ckpt(h, d), lambda m: m["config"].update(moe_jitter=0.1), reseal=True)


@builder
def ckpt_invalid_config(h, d):
  """A stored config that cannot be a model: top_k above n_experts (checksums consistent)."""
  return _edit_meta(_copy_ckpt(h, d), lambda m: m["config"].update(top_k=99), reseal=True)


@builder
def a_file(h, d):
  out = d / "plain.txt"
  out.write_text("not a folder\n")
  return out


# ---- training output folders ----------------------------------------------------------------
@builder
def shipped_copy(h, d):
  """A copy of checkpoints/small_moe (the default --ckpt_dir: no manifest)."""
  out = d / "small_moe"
  shutil.copytree(REPO / "checkpoints" / "small_moe", out)
  return out


@builder
def other_run_dir(h, d):
  """A folder owned by another training run (other settings and seed)."""
  out = d / "run"
  OutputFolder.claim(out, RunIdentity("train_small_moe", {"model": "other", "steps": 9}, 7),
                     ("step_*", "final", "metrics.json")).finish()
  return out


@builder
def bad_manifest_dir(h, d):
  out = d / "run"
  out.mkdir()
  (out / "manifest.json").write_text('{"script": "train_small_moe", "config": ')
  return out


# ---- safetensors ----------------------------------------------------------------------------
def _export(h: Hostile, d: Path, edit=None, name="model.safetensors") -> Path:
  tensors = dict(safetensors.numpy.load_file(str(h.build("tiny_safetensors"))))
  if edit is not None:
    edit(tensors)
  out = d / name
  safetensors.numpy.save_file(tensors, str(out))
  return out


@builder
def tiny_safetensors(h, d):
  """A valid tiny checkpoint in DeepSeek naming (tiny has a shared expert)."""
  return ckpt.export_hf_safetensors(MoETransformer(model_config("tiny"), nnx.Rngs(1)),
                                    d / "tiny.safetensors", "deepseek")


EXPERT = "model.layers.0.mlp.experts.3.up_proj.weight"
NORM = "model.layers.1.post_attention_layernorm.weight"


@builder
def st_int32(h, d):
  return _export(h, d, lambda t: t.update({EXPERT: np.ones_like(t[EXPERT], np.int32)}))


@builder
def st_bool(h, d):
  return _export(h, d, lambda t: t.update({NORM: np.ones_like(t[NORM], bool)}))


@builder
def st_nan(h, d):
  def edit(t):
    t[EXPERT] = t[EXPERT].copy()
    t[EXPERT][0, 0] = np.nan
  return _export(h, d, edit)


@builder
def st_inf(h, d):
  def edit(t):
    t[NORM] = t[NORM].copy()
    t[NORM][:2] = -np.inf
  return _export(h, d, edit)


@builder
def st_missing(h, d):
  return _export(h, d, lambda t: t.pop(EXPERT))


@builder
def st_misshaped(h, d):
  return _export(h, d, lambda t: t.update({NORM: np.ones(3, np.float32)}))


@builder
def st_unsupported(h, d):
  return _export(h, d, lambda t: t.update(
      {"model.layers.0.self_attn.q_norm.weight": np.ones(32, np.float32)}))


@builder
def st_truncated(h, d):
  src = h.build("tiny_safetensors").read_bytes()
  out = d / "cut.safetensors"
  out.write_bytes(src[:len(src) // 2])
  return out


@builder
def st_text(h, d):
  out = d / "notes.safetensors"
  out.write_text("these are not weights\n")
  return out


@builder
def empty_dir(h, d):
  return d


# ---- placements -----------------------------------------------------------------------------
def _placement_file(d: Path, edit) -> Path:
  """A valid 3-server placement of 2 layers x 4 experts (expert e on server e % 3, expert 0 of
  layer 0 also on server 1), written as JSON after ``edit(dict)``."""
  hosts = np.zeros((3, 2, 4), bool)
  for e in range(4):
    hosts[e % 3, :, e] = True
  hosts[1, 0, 0] = True
  route = np.where(hosts, np.arange(3)[:, None, None], 0)
  for n in range(3):
    for l in range(2):
      for e in range(4):
        if not hosts[n, l, e]:
          route[n, l, e] = e % 3
  p = Placement(hosts, route.astype(np.int32), slot_table(hosts), "hand")
  p.validate()
  d_ = p.to_dict()
  edit(d_)
  out = d / "placement.json"
  out.write_text(json.dumps(d_))
  return out


@builder
def pl_route_to_non_host(h, d):
  return _placement_file(d, lambda p: p["route"][0][1].__setitem__(1, 2))


@builder
def pl_hosted_routed_away(h, d):
  return _placement_file(d, lambda p: p["route"][1][0].__setitem__(0, 0))


@builder
def pl_hosted_nowhere(h, d):
  def edit(p):
    p["hosts"][2][1][2] = 0
  return _placement_file(d, edit)


@builder
def pl_route_out_of_range(h, d):
  return _placement_file(d, lambda p: p["route"][2][0].__setitem__(3, 7))


@builder
def pl_slot_mismatch(h, d):
  return _placement_file(d, lambda p: p["slot_expert"][0][0].__setitem__(0, 3))
