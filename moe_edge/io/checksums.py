"""Content checksums of a folder's files: written when a result is saved, verified when it is read.

``<folder>/checksums.json``::

  {"algorithm": "sha256", "files": {"params/manifest.ocdbt": {"bytes": 116, "sha256": "..."}, ...}}

lists every file under the folder (relative POSIX paths) except itself. :func:`verify` reports the
first missing, truncated or changed file by name; files added later are ignored.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moe_edge.core.errors import MoeEdgeError
from moe_edge.io import atomic

CHECKSUM_FILE = "checksums.json"
_CHUNK = 1 << 20


class ChecksumError(MoeEdgeError):
  """A file does not match the checksum recorded when it was written."""


def file_digest(path: str | Path) -> str:
  """sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def compute(folder: str | Path) -> dict[str, dict]:
  """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` but the checksum
  file itself, in sorted order."""
  folder = Path(folder)
  out = {}
  for p in sorted(folder.rglob("*")):
    rel = p.relative_to(folder).as_posix()
    if p.is_file() and rel != CHECKSUM_FILE:
      out[rel] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
  return out


def write(folder: str | Path) -> Path:
  """Write ``<folder>/checksums.json`` for the folder's current files (atomically)."""
  folder = Path(folder)
  return atomic.write_json(folder / CHECKSUM_FILE,
                           {"algorithm": "sha256", "files": compute(folder)})


def verify(folder: str | Path, error: type[Exception] = ChecksumError, what: str = "") -> None:
  """Raise ``error`` naming the first file of ``folder`` that is missing, truncated or changed
  since :func:`write`, or when the checksum file itself is missing or unreadable.

  ``what``: how to call the folder in the message (default: its path).
  """
  folder = Path(folder)
  what = what or str(folder)
  path = folder / CHECKSUM_FILE
  if not path.is_file():
    raise error(f"{what} has no {CHECKSUM_FILE}, so its content cannot be verified; it was "
                f"written by an older moe-edge or copied incompletely.")
  try:
    files = json.loads(path.read_text())["files"]
    entries = [(str(rel), int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise error(f"{path} is corrupt ({type(e).__name__}: {e}); the checkpoint cannot be "
                f"verified.") from None
  for rel, size, digest in entries:
    p = folder / rel
    if not p.is_file():
      raise error(f"{what} is incomplete: file {rel} is missing.")
    got = p.stat().st_size
    if got != size:
      raise error(f"{what}: file {rel} has {got:,} bytes but {size:,} were written "
                  f"({'truncated' if got < size else 'appended to'}); the file is corrupt.")
    if file_digest(p) != digest:
      raise error(f"{what}: file {rel} is corrupt: its sha256 differs from the one recorded "
                  f"at save; restore the file from a good copy.")
