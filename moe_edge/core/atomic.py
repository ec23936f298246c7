"""Atomic writes: a file or directory appears at its final path complete, or not at all.

Everything is first written to a temporary sibling (same folder, so the final ``os.replace`` is a
rename on one file system) whose name starts with ``.`` and contains ``.partial-``: a crash
leaves only such a sibling, never a half-written result under the real name.
:func:`partial_siblings` finds what interrupted writes left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

PARTIAL_TAG = ".partial-"


def temp_sibling(path: str | Path) -> Path:
  """A fresh hidden name next to ``path``: ``<dir>/.<name>.partial-<random>``."""
  path = Path(path)
  return path.parent / f".{path.name}{PARTIAL_TAG}{uuid.uuid4().hex[:12]}"


def partial_siblings(folder: str | Path, name: str | None = None) -> list[Path]:
  """Leftovers of interrupted atomic writes in ``folder`` (of ``name`` only, if given)."""
  folder = Path(folder)
  if not folder.is_dir():
    return []
  prefix = f".{name}{PARTIAL_TAG}" if name is not None else "."
  return sorted(p for p in folder.iterdir()
                if p.name.startswith(prefix) and PARTIAL_TAG in p.name)


def remove(path: Path) -> None:
  """Delete a file, link or directory tree at ``path`` (nothing there: no-op)."""
  if path.is_symlink() or path.is_file():
    path.unlink()
  elif path.is_dir():
    shutil.rmtree(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
  """Yield a temporary file path; on success it is renamed to ``path``, on error deleted.

  For writers that take a file name (``np.savez``, ``fig.savefig``): write to the yielded path
  (keep its suffix in mind: the temporary name ends in a random tag, so pass a file object or a
  writer that does not append a suffix).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_sibling(path)
  try:
    yield tmp
    if not tmp.exists():
      raise FileNotFoundError(f"atomic write of {path}: nothing was written to {tmp}.")
    os.replace(tmp, path)
  finally:
    remove(tmp)


def write_bytes(path: str | Path, data: bytes) -> Path:
  """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename)."""
  path = Path(path)
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return path


def write_text(path: str | Path, text: str) -> Path:
  """Write ``text`` (UTF-8) to ``path`` atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1, default=None) -> Path:
  """Write ``obj`` as JSON to ``path`` atomically (serialisation errors leave nothing)."""
  return write_text(path, json.dumps(obj, indent=indent, default=default))


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
  """Yield a temporary directory; on success it is renamed to ``path``, on error deleted.

  Args:
    path: the final directory.
    replace: an existing ``path`` is replaced (moved aside, the new one renamed in, then the old
      one deleted); without it an existing ``path`` raises ``FileExistsError`` before the body.
  """
  path = Path(path)
  if path.exists() and not replace:
    raise FileExistsError(f"{path} exists.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_sibling(path)
  tmp.mkdir()
  try:
    yield tmp
    old = None
    if path.exists():
      old = temp_sibling(path)
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      remove(old)
  finally:
    remove(tmp)
