"""Run manifests and output-folder ownership.

A run that writes into a folder first *claims* it (:meth:`OutputFolder.claim`), before any work,
so a bad or occupied folder costs nothing. The claim writes ``<folder>/manifest.json``::

  {"format": 1, "script": "place", "config": {...}, "seed": 0,      <- the run's identity
   "command": "...", "code": {"moe_edge": "0.1.0", "git_commit": "...", "git_dirty": false},
   "python": "3.11.7", "packages": {"jax": "0.10.2", ...},
   "status": "running" | "complete", "started": "...", "finished": "...",
   "files": ["tables.csv", "step_00000020", ...]}                   <- what the run owns

and keeps ``files`` up to date as the run writes (each file atomically). Ownership rules:

* the same identity (script, config, seed; the code version is recorded, not compared) replaces
  its own files; files of the previous run it does not write again are removed at
  :meth:`OutputFolder.finish`, so no stale result survives next to new ones;
* another identity is refused, unless ``overwrite``: then the previous run's files are deleted
  at the claim, before the new run writes anything;
* a folder without a manifest is refused only where it already holds a file the run would write
  (its declared ``outputs``); hand-written READMEs and input caches are never a run's files;
* the manifest of a run that failed before writing any file (status "running", no file left)
  claims nothing: the next run takes the folder as if it had none.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from moe_edge.core.errors import MoeEdgeError
from moe_edge.io import atomic

MANIFEST = "manifest.json"
#: File-system timestamps come from a coarse clock (a few ms behind time.time_ns()).
_MTIME_SLACK_NS = 50_000_000
FORMAT_VERSION = 1
# Packages whose versions a manifest records (the project's dependencies).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "absl-py", "scipy",
            "matplotlib", "safetensors", "ml_collections")
_REPO = Path(__file__).resolve().parents[2]


class OutputError(MoeEdgeError):
  """An output folder cannot be used: it holds another run's results, or is not writable."""


def _plain(obj) -> Any:
  """``obj`` as plain JSON values (tuples become lists), so identities compare as stored."""
  return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
  if dataclasses.is_dataclass(o) and not isinstance(o, type):
    return dataclasses.asdict(o)
  if hasattr(o, "tolist"):  # numpy arrays and scalars
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON-serialisable in a run identity: {type(o).__name__}")


@dataclasses.dataclass(frozen=True)
class RunIdentity:
  """What makes two runs the same run: the script, its full configuration and its seed."""
  script: str
  config: dict
  seed: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "config", _plain(self.config))

  def differences(self, other: "RunIdentity") -> list[str]:
    """Human-readable ``key: ours vs theirs`` for every differing setting (empty: same run)."""
    out = []
    if self.script != other.script:
      out.append(f"script: {other.script} vs {self.script}")
    if self.seed != other.seed:
      out.append(f"seed: {other.seed} vs {self.seed}")
    for key in sorted(set(self.config) | set(other.config)):
      a, b = other.config.get(key, "<unset>"), self.config.get(key, "<unset>")
      if a != b:
        out.append(f"{key}: {_short(a)} vs {_short(b)}")
    return out


def _short(v) -> str:
  s = json.dumps(v)
  return s if len(s) <= 60 else s[:57] + "..."


def code_version() -> dict:
  """moe_edge's version and, when run from a git checkout, its commit and whether it is dirty."""
  try:
    version = importlib.metadata.version("moe_edge")
  except importlib.metadata.PackageNotFoundError:
    version = None
  out = {"moe_edge": version, "git_commit": None, "git_dirty": None}
  try:
    commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10)
    if commit.returncode == 0:
      out["git_commit"] = commit.stdout.strip()
      dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain",
                              "--untracked-files=no"], capture_output=True, text=True, timeout=30)
      out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
  except (OSError, subprocess.TimeoutExpired):
    pass
  return out


def package_versions() -> dict[str, str | None]:
  """Installed versions of :data:`PACKAGES` (None: not installed)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def read_manifest(folder: str | Path, manifest: str = MANIFEST) -> dict | None:
  """``<folder>/<manifest>`` (default ``manifest.json``) as a dict, or None when there is
  none."""
  path = Path(folder) / manifest
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
    RunIdentity(data["script"], data["config"], data.get("seed"))
    list(data["files"])
  except (ValueError, KeyError, TypeError) as e:
    raise OutputError(f"{path} is not a readable run manifest ({type(e).__name__}: {e}); "
                      f"delete it or pass --overwrite to replace the folder's results.") from None
  return data


def check_output_file(path: str | Path, overwrite: bool = False, suffix: str | None = None
                      ) -> Path:
  """Check, before any work, that a one-file result can be written at ``path``; raise
  :class:`OutputError` naming the fix otherwise. An existing file is replaced only with
  ``overwrite`` (the caller then writes atomically, so the old file survives a failed run).

  Args:
    path: the output file.
    overwrite: allow replacing an existing file.
    suffix: the required file suffix (``".npz"``), if any.
  """
  path = Path(path)
  if suffix is not None and path.suffix != suffix:
    raise OutputError(f"--out {path}: the file must end in {suffix}.")
  if path.is_dir():
    raise OutputError(f"--out {path} is a folder; give a file path ending in "
                      f"{suffix or 'a file name'}.")
  if path.exists() and not overwrite:
    raise OutputError(f"--out {path} already exists; choose another path, or pass --overwrite "
                      f"to replace it.")
  blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise OutputError(f"cannot write --out {path}: {blocking} is a file, not a folder; choose "
                      f"another path.")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = atomic.temp_sibling(path)
    probe.touch()
    probe.unlink()
  except OSError as e:
    raise OutputError(f"cannot write --out {path}: {e.strerror or e}; choose another "
                      f"path.") from None
  return path


def _identity(data: dict) -> RunIdentity:
  return RunIdentity(data["script"], data["config"], data.get("seed"))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class OutputFolder:
  """A folder claimed by one run; see the module docstring for the ownership rules."""

  def __init__(self, folder: Path, identity: RunIdentity, outputs: Sequence[str],
               inherited: Sequence[str], keep_inherited: bool, command: str,
               manifest: str = MANIFEST):
    self.folder = folder
    self.manifest = manifest
    self.identity = identity
    self.outputs = tuple(outputs)
    self._inherited = set(inherited)
    self._keep_inherited = keep_inherited
    self._files: set[str] = set(inherited)
    self._written: set[str] = set()
    self._claimed_ns = time.time_ns()
    self._data = {"format": FORMAT_VERSION, "script": identity.script,
                  "config": identity.config, "seed": identity.seed, "command": command,
                  "code": code_version(), "python": platform.python_version(),
                  "packages": package_versions(), "status": "running", "started": _now(),
                  "finished": None, "files": []}

  # ---- claiming ----------------------------------------------------------------------------
  @classmethod
  def claim(cls, folder: str | Path, identity: RunIdentity, outputs: Sequence[str],
            overwrite: bool = False, resume: bool = False, replace_same: bool = True,
            refuse_hint: str = "choose another folder, or pass --overwrite to replace them",
            command: str | None = None, leftovers: Sequence[str] = (),
            manifest: str = MANIFEST) -> "OutputFolder":
    """Check ``folder`` for this run and take it over; raises :class:`OutputError` if refused.

    Args:
      folder: the output folder (created if missing).
      identity: this run's identity.
      outputs: ``fnmatch`` patterns of the top-level names this run writes (``"step_*"``).
      overwrite: replace another run's files (deleted now) and unrecorded clashing outputs.
      resume: continue the recorded run; its identity must equal ``identity``.
      replace_same: the same identity without ``resume`` replaces its files; False refuses it
        too (training: a second run must say ``--resume`` or ``--overwrite``).
      refuse_hint: the fix printed when refused.
      command: the command line recorded (default: ``sys.argv``).
      leftovers: names the caller will clean up itself (remains of interrupted writes); they are
        not counted as clashes.
      manifest: the manifest's file name; scripts that share one folder (the two extension
        sweeps in ``results/extensions``) each keep their own (``<script>.manifest.json``), and
        each owns only its declared outputs there.
    """
    folder = Path(folder).resolve()
    if resume and overwrite:
      raise OutputError("--resume and --overwrite contradict each other; pass one of them.")
    if folder.exists() and not folder.is_dir():
      raise OutputError(f"output folder {folder} is a file; choose a folder path.")
    try:
      folder.mkdir(parents=True, exist_ok=True)
      probe = atomic.temp_sibling(folder / "write-probe")
      probe.touch()
      probe.unlink()
    except OSError as e:
      raise OutputError(f"cannot write to output folder {folder}: {e.strerror or e}; choose "
                        f"another folder.") from None
    prev = read_manifest(folder, manifest)
    if (prev is not None and prev.get("status") == "running"
        and not any((folder / f).exists() for f in prev["files"])):
      prev = None  # a run that failed before writing any result claims nothing
    inherited: list[str] = []
    if prev is not None:
      diff = identity.differences(_identity(prev))
      where = f"{folder} holds the results of another run ({folder / manifest}"
      if resume and diff:
        raise OutputError(f"--resume: {where}) with different settings: {'; '.join(diff)}. "
                          f"Resume with the same settings, or start a new folder.")
      if resume or (not diff and replace_same):
        inherited = [f for f in prev["files"] if (folder / f).exists()]
      elif overwrite:
        for f in prev["files"]:
          atomic.remove(folder / f)
      else:
        what = "; ".join(diff) if diff else "the same settings"
        raise OutputError(f"{where}: {what}); {refuse_hint}.")
    clash = sorted(p.name for p in folder.iterdir()
                   if p.name != manifest and p.name not in inherited and p.name not in leftovers
                   and atomic.PARTIAL_TAG not in p.name
                   and any(fnmatch.fnmatchcase(p.name, pat) for pat in outputs))
    if clash and not overwrite:
      raise OutputError(f"{folder} already holds {', '.join(clash[:6])}"
                        f"{' ...' if len(clash) > 6 else ''}, not recorded as this run's "
                        f"outputs; {refuse_hint}.")
    for name in clash:
      atomic.remove(folder / name)
    if command is None:
      command = " ".join(shlex.quote(a) for a in sys.argv)
    out = cls(folder, identity, outputs, inherited, keep_inherited=resume, command=command,
              manifest=manifest)
    out._save()
    return out

  # ---- writing -----------------------------------------------------------------------------
  def path(self, name: str) -> Path:
    """The path of output ``name`` (a top-level name matching one of the declared outputs)."""
    top = Path(name).parts[0]
    if not any(fnmatch.fnmatchcase(top, pat) for pat in self.outputs):
      raise ValueError(f"{name!r} is not among the declared outputs {self.outputs} of "
                       f"{self.identity.script}; declare it in OutputFolder.claim.")
    return self.folder / name

  def record(self, name: str) -> Path:
    """Mark output ``name`` (written by other code, e.g. a checkpoint) as this run's file."""
    path = self.path(name)
    top = Path(name).parts[0]
    self._files.add(top)
    self._written.add(top)
    self._save()
    return path

  def record_new(self) -> list[str]:
    """Record every top-level entry matching the declared outputs that was written since the
    claim (for writers that take a folder, such as the tables and plots); return their
    names. Older files (a previous run's) are left to :meth:`finish`."""
    new = sorted(p.name for p in self.folder.iterdir()
                 if p.name != self.manifest and atomic.PARTIAL_TAG not in p.name
                 and any(fnmatch.fnmatchcase(p.name, pat) for pat in self.outputs)
                 and p.stat().st_mtime_ns >= self._claimed_ns - _MTIME_SLACK_NS)
    for name in new:
      self._files.add(name)
      self._written.add(name)
    self._save()
    return new

  def forget(self, name: str) -> None:
    """Drop ``name`` from the run's files (after the run deleted it, e.g. pruning)."""
    self._files.discard(name)
    self._written.discard(name)
    self._inherited.discard(name)
    self._save()

  def write_text(self, name: str, text: str) -> Path:
    atomic.write_text(self.path(name), text)
    return self.record(name)

  def write_bytes(self, name: str, data: bytes) -> Path:
    atomic.write_bytes(self.path(name), data)
    return self.record(name)

  def write_json(self, name: str, obj, indent: int | None = 1, default=None) -> Path:
    atomic.write_json(self.path(name), obj, indent=indent, default=default)
    return self.record(name)

  @contextlib.contextmanager
  def atomic_path(self, name: str) -> Iterator[Path]:
    """Yield a temporary path for writers that take a path (``fig.savefig(tmp, format="png")``,
    ``np.savez(open(tmp, "wb"), ...)``); on success it becomes output ``name`` and is recorded."""
    with atomic.atomic_path(self.path(name)) as tmp:
      yield tmp
    self.record(name)

  def discard_previous(self) -> None:
    """Remove the previous run's files not written yet (same-identity rerun), now: a run whose
    results must never sit beside an older run's (one set written together) calls this just
    before its first write."""
    if not self._keep_inherited:
      for name in sorted(self._inherited - self._written):
        atomic.remove(self.folder / name)
        self._files.discard(name)
      self._inherited &= self._written
      self._save()

  def finish(self) -> None:
    """Remove the previous run's files not written again (same-identity rerun) and mark the
    manifest complete."""
    if not self._keep_inherited:
      for name in sorted(self._inherited - self._written):
        atomic.remove(self.folder / name)
        self._files.discard(name)
    self._data["status"] = "complete"
    self._data["finished"] = _now()
    self._save()

  @property
  def files(self) -> list[str]:
    return sorted(self._files)

  def _save(self) -> None:
    self._data["files"] = self.files
    atomic.write_json(self.folder / self.manifest, self._data)
