"""Config-file handling shared by the experiment scripts (not part of the library).

Every experiment script takes its settings from one config file, big_vision style::

  python experiments/migration.py --config configs/experiments/migration.py --config.alpha=0.7
  python experiments/reproduce_tables.py --config edge_tables --config.link_gbps=0.5

``--config`` is a preset file whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(or a preset *name*: ``edge_tables`` = ``configs/experiments/edge_tables.py``);
``--config.KEY=VALUE`` overrides one setting. The script then builds its validated frozen config
(``ExperimentConfig``, ``MigrationRun``, ...) from the ConfigDict.

The entry point is :func:`moe_edge.io.cli.run` with this module's :func:`parse_flags`
(:func:`run` here does exactly that), so every script of the repository reports bad input the
same way: one line ``<script>.py: error: <message>`` on stderr and exit code 2, for an unknown
preset, an unknown key (with a hint), a value of the wrong type (``ml_collections`` checks
types), an invalid value (the frozen config's validation) and bad input files alike. Output
folders are flags next to the config, as in every other script: ``--out`` and ``--overwrite``
(a folder holding another config's results is refused without it; see
moe_edge.io.OutputFolder).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable

from absl import flags
from ml_collections import config_flags

from moe_edge.config import ConfigError
from moe_edge.io import OutputFolder, RunIdentity, cli

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "experiments"
_DEFAULT: dict[str, str] = {}
#: The argv the config flag reads its --config.KEY overrides off: empty while the script's
#: module is imported (the preset's defaults), the real one from parse_flags on.
_ARGV: list[str] = []


def presets() -> list[str]:
  return sorted(p.stem for p in PRESETS.glob("*.py") if not p.stem.startswith("_"))


def define_config(default: str, help_text: str = "") -> config_flags.FlagHolder:
  """``--config`` (a preset file or name, default ``configs/experiments/<default>.py``) with
  ``--config.KEY=VALUE`` overrides (read off the argv of :func:`parse_flags`)."""
  _DEFAULT["config"] = str(PRESETS / f"{default}.py")
  return config_flags.DEFINE_config_file(
      "config", _DEFAULT["config"],
      help_text or f"Experiment preset: a file whose get_config() returns a ConfigDict, or a "
      f"preset name ({', '.join(presets())}); override settings with --config.KEY=VALUE.",
      lock_config=True, sys_argv=_ARGV)


def _preset_path(value: str) -> str:
  """A preset name becomes its file; unknown names and missing files fail listing the known
  presets."""
  path, sep, arg = value.partition(":")
  if path.endswith(".py") or "/" in path:
    if not Path(path).is_file():
      raise ConfigError(f"--config {path}: no such config file. Known experiments: "
                        f"{', '.join(presets())} (files under {PRESETS}).")
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
  """absl's flag parsing with preset names expanded; an unknown preset or key raises
  ConfigError (reported in one line by moe_edge.io.cli)."""
  argv = [argv[0], *_expand(list(argv[1:]))] if argv else []
  if argv and not any(a == "--config" or a.startswith("--config=") for a in argv):
    # Parsing --config is what registers the --config.KEY overrides of this argv.
    argv.insert(1, f"--config={_DEFAULT['config']}")
  _ARGV[:] = argv  # the config flag reads its overrides off this list
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # a previous parse's overrides (in-process runs, tests)
  try:
    return flags.FLAGS(list(argv))
  except (AttributeError, KeyError) as e:
    raise ConfigError(_unknown_key(argv, e)) from None


def _unknown_key(argv: list[str], e: Exception) -> str:
  path = _config_file(argv)
  text = str(e)
  found = re.search(r"'([A-Za-z0-9_]+)", text)
  key = found.group(1) if found else text
  hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
  bad = next((a.partition("=")[0] for a in argv if a.startswith("--config.")
              and key in a.partition("=")[0].split(".")), f"--config.{key}")
  return (f"{bad}: no such setting in {path}"
          + (f" (did you mean {hint.group(1)}?)" if hint else "")
          + f"; known: {', '.join(_known_keys(path))}.")


def define_output(default: str) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """``--out`` (default ``default``) and ``--overwrite``, the output flags of a config script."""
  out = flags.DEFINE_string("out", default, "Output folder, claimed before any work (a "
                            "manifest records the run's command, config, seed and files).")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace the results of another run "
                                "(other settings, or files no manifest records) in --out.")
  return out, overwrite


def claim(script: str, folder: str | Path, config, outputs: tuple[str, ...],
          seed: int | None = None, overwrite: bool = False,
          manifest: str = "manifest.json") -> OutputFolder:
  """Claim the output folder for this run before any work (moe_edge.io.OutputFolder): the
  same config replaces its own files, another config (or files the run would write that no
  manifest records, e.g. the committed results before their first manifest) is refused unless
  ``--overwrite``. ``config``: a dict or ConfigDict (recorded and compared)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return OutputFolder.claim(folder, RunIdentity(script, config, seed), outputs,
                            overwrite=overwrite, manifest=manifest,
                            refuse_hint="choose another --out, or pass --overwrite to replace "
                                        "them")


def run(main: Callable[[list[str]], object]) -> None:
  """:func:`moe_edge.io.cli.run` with :func:`parse_flags` (one-line errors, exit 2)."""
  cli.run(main, parser=parse_flags)


def invoke(main: Callable[[list[str]], object], argv: list[str]) -> int:
  """:func:`moe_edge.io.cli.invoke` with :func:`parse_flags`: a config script's ``main``
  in-process (tests); returns the exit code."""
  return cli.invoke(main, argv, parser=parse_flags)
