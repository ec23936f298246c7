"""Command-line plumbing shared by the experiment scripts (not part of the library).

Every experiment script takes its settings from one config file, big_vision style::

  python experiments/migration.py --config configs/experiments/migration.py --config.alpha=0.7
  python experiments/reproduce_tables.py --config paper_tables --config.link_gbps=0.5

``--config`` is a preset file whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(or a preset *name*: ``paper_tables`` = ``configs/experiments/paper_tables.py``);
``--config.KEY=VALUE`` overrides one setting. The script then builds its validated frozen config
(``ExperimentConfig``, ``MigrationRun``, ...) from the ConfigDict, so a bad override is one line
on stderr: an unknown key, a value of the wrong type (``ml_collections`` checks types) or an
invalid value (the frozen config's validation).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from moe_edge.config import ConfigError
from moe_edge.placement.problem import PlacementError

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "experiments"
ERRORS = (ConfigError, PlacementError)  # the library's errors: reported in one line
_DEFAULT: dict[str, str] = {}


def presets() -> list[str]:
  return sorted(p.stem for p in PRESETS.glob("*.py") if not p.stem.startswith("_"))


def define_config(default: str, help_text: str = "") -> config_flags.FlagHolder:
  """``--config`` (a preset file or name, default ``configs/experiments/<default>.py``) with
  ``--config.KEY=VALUE`` overrides. ``ml_collections`` reads the overrides off ``sys.argv``
  when the flag is defined, so preset names are expanded and unknown keys reported here."""
  _DEFAULT["config"] = str(PRESETS / f"{default}.py")
  try:
    sys.argv[1:] = _expand(sys.argv[1:])
    return config_flags.DEFINE_config_file(
        "config", _DEFAULT["config"],
        help_text or f"Experiment preset: a file whose get_config() returns a ConfigDict, or a "
        f"preset name ({', '.join(presets())}); override settings with --config.KEY=VALUE.",
        lock_config=True)
  except ConfigError as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  except (AttributeError, KeyError) as e:
    _unknown_key(sys.argv, e)


def _preset_path(value: str) -> str:
  """A preset name becomes its file; unknown names fail listing the known ones."""
  path, sep, arg = value.partition(":")
  if path.endswith(".py") or "/" in path:
    return value
  if not (PRESETS / f"{path}.py").is_file():
    raise ConfigError(f"Unknown experiment config {path!r}. Known experiments: "
                      f"{', '.join(presets())} (files under {PRESETS}).")
  return str(PRESETS / f"{path}.py") + sep + arg


def _expand(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      out += [a, _preset_path(argv[i + 1])]
      i += 2
      continue
    if a.startswith("--config="):
      a = "--config=" + _preset_path(a[len("--config="):])
    out.append(a)
    i += 1
  return out


def _config_file(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--config="):
      return a[len("--config="):]
  return _DEFAULT["config"]


def _known_keys(path: str) -> list[str]:
  spec = importlib.util.spec_from_file_location("_preset", path.partition(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return sorted(module.get_config().keys())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser: bad overrides reported in one line."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  except (AttributeError, KeyError) as e:
    _unknown_key(argv, e)


def _unknown_key(argv: list[str], e: Exception) -> None:
  path = _config_file(argv)
  text = str(e)
  found = re.search(r"'([A-Za-z0-9_]+)", text)
  key = found.group(1) if found else text
  hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
  bad = next((a.partition("=")[0] for a in argv if a.startswith("--config.")
              and key in a.partition("=")[0].split(".")), f"--config.{key}")
  sys.exit(f"FATAL Flags parsing error: {bad}: no such setting in {path}"
           + (f" (did you mean {hint.group(1)}?)" if hint else "")
           + f"; known: {', '.join(_known_keys(path))}.")


def build(fn: Callable, *args):
  """``fn(*args)`` (e.g. building the frozen config); a library error exits with one line."""
  try:
    return fn(*args)
  except ERRORS as e:
    sys.exit(f"FATAL config error: {e}")


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`; a library error exits with one line."""

  def guarded(argv):
    try:
      main(argv)
    except ERRORS as e:
      sys.exit(f"error: {e}")

  app.run(guarded, flags_parser=parse_flags)
