"""Reading moe-edge's data files so that a damaged file is one error naming it.

Every loader (trace, placement, routing statistics, calibration, requests) reads through
:func:`read_npz` or :func:`read_json`: a missing, zero-byte, truncated, byte-flipped or
wrong-type file (a ``.npy`` or a text file named ``.npz``, an ``.npz`` named ``.json``, pickled
object arrays) raises the loader's own :class:`~moe_edge.core.errors.MoeEdgeError` subclass
with one line: the path, what is wrong with it, and how to get a good file. Arrays are read
eagerly, so a CRC error deep in an archive surfaces here and not at first use.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from moe_edge.core.errors import MoeEdgeError

# What numpy / zipfile / json raise on a damaged file (never a bug of the caller).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
                UnicodeDecodeError)


def _problem(err: BaseException) -> str:
  text = " ".join(str(err).split())
  if isinstance(err, EOFError) or "No data left" in text:
    return "it is empty (0 bytes) or cut short"
  if "pickle" in text:
    return "it is not a numpy .npz archive (numpy would need to unpickle it)"
  if isinstance(err, zipfile.BadZipFile) or isinstance(err, zlib.error):
    return f"the archive is truncated or corrupt ({type(err).__name__}: {text})"
  return f"{type(err).__name__}: {text}"


def check_file(path: str | Path, error: type[MoeEdgeError], what: str, fix: str) -> Path:
  """``path`` as a Path if it is a regular non-empty file, else ``error``."""
  path = Path(path)
  if not path.exists():
    raise error(f"no {what} file at {path}; {fix}")
  if not path.is_file():
    raise error(f"{path} is a directory, not a {what} file; {fix}")
  if path.stat().st_size == 0:
    raise error(f"{path} is not a readable {what} file: it is empty (0 bytes); {fix}")
  return path


def read_npz(path: str | Path, error: type[MoeEdgeError], what: str, fix: str,
             required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` at ``path`` (read now), with ``required`` names present.

  Args:
    path: the file.
    error: the loader's error class (``TraceError``, ``PlacementError``, ...).
    what: what the file should hold, for the message ("ActivationTrace", ...).
    fix: how to get a good file, ending the message ("re-record it with ...").
    required: array names the file must hold.
  """
  path = check_file(path, error, what, fix)
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise error(f"{path} is a single .npy array, not a {what} .npz archive; {fix}")
    with z:
      arrays = {k: np.asarray(z[k]) for k in z.files}
  except MoeEdgeError:
    raise
  except _READ_ERRORS as err:
    raise error(f"{path} is not a readable {what} file: {_problem(err)}; {fix}") from None
  missing = [k for k in required if k not in arrays]
  if missing:
    raise error(f"{path} is not a {what} file: it lacks the arrays {missing} (it holds "
                f"{sorted(arrays)}); {fix}")
  return arrays


def read_json(path: str | Path, error: type[MoeEdgeError], what: str, fix: str,
              required: tuple[str, ...] = ()) -> dict:
  """The JSON object in the file at ``path`` with the ``required`` keys present."""
  path = check_file(path, error, what, fix)
  try:
    obj = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError) as err:
    raise error(f"{path} is not a readable {what} file: it is not UTF-8 text "
                f"({type(err).__name__}); {fix}") from None
  except json.JSONDecodeError as err:
    raise error(f"{path} is not a readable {what} file: corrupt JSON ({err}); {fix}") from None
  return check_keys(obj, path, error, what, fix, required)


def json_field(text: str, path: str | Path, error: type[MoeEdgeError], what: str, fix: str,
               required: tuple[str, ...] = ()) -> dict:
  """A JSON object stored inside a file (e.g. an ``.npz``'s ``metadata`` string)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as err:
    raise error(f"{path}: its {what} is corrupt JSON ({err}); {fix}") from None
  return check_keys(obj, path, error, what, fix, required)


def check_keys(obj, path: str | Path, error: type[MoeEdgeError], what: str, fix: str,
               required: tuple[str, ...] = ()) -> dict:
  """``obj`` if it is a dict holding ``required``, else ``error`` naming the file."""
  if not isinstance(obj, dict):
    raise error(f"{path}: the {what} must be a JSON object, got {type(obj).__name__}; {fix}")
  missing = [k for k in required if k not in obj]
  if missing:
    raise error(f"{path}: the {what} lacks the keys {missing}; {fix}")
  return obj
