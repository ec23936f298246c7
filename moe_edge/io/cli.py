"""Script entry points: configuration and input errors become one usage line, bugs keep their
traceback.

  from moe_edge.io import cli
  if __name__ == "__main__":
    cli.run(main)

instead of ``app.run(main)``. A flag error (unknown flag, bad value, failed validator), an
``app.UsageError`` and every :class:`~moe_edge.core.errors.MoeEdgeError` (``CheckpointError``,
``PlacementError``, ``OutputError``, ...) print

  <script>: error: <message on one line>

to stderr and exit with :data:`USAGE_EXIT` (2). Configuration errors and input-file problems
(a corrupt trace, a placement of another model) are not told apart: both are the user's to fix
and exit 2; exit 1 is left to Python (an uncaught exception). Any other exception is a bug in
moe-edge and propagates with its traceback. :func:`invoke` does the same in-process (tests call
a script's ``main`` through it) and returns the exit code.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags

from moe_edge.core.errors import MoeEdgeError

USAGE_EXIT = 2


def is_user_error(exc: BaseException) -> bool:
  """True for errors that describe bad configuration or input, not a bug: ``app.UsageError``,
  absl flag errors and :class:`MoeEdgeError`."""
  return isinstance(exc, (app.UsageError, flags.Error, MoeEdgeError))


def error_line(script: str, exc: BaseException) -> str:
  """``<script>: error: <message>`` with the message's lines joined."""
  msg = " ".join(str(exc).split()) or type(exc).__name__
  return f"{script}: error: {msg}"


def _script_name(argv: Sequence[str]) -> str:
  return Path(argv[0]).name if argv else "moe-edge"


def _fail(script: str, exc: BaseException) -> None:
  sys.stderr.write(error_line(script, exc) + "\n")
  sys.stderr.flush()
  sys.exit(USAGE_EXIT)


def check_flags(values, at_least_1: Sequence[str] = (), at_least_0: Sequence[str] = (),
                ranges: dict[str, tuple[float, float, bool]] | None = None) -> None:
  """Raise ``app.UsageError`` naming the first flag of ``values`` (absl ``FLAGS``) that cannot
  make a run: an integer of ``at_least_1`` below 1, of ``at_least_0`` below 0, or a float of
  ``ranges`` (``name -> (low, high, low excluded)``) that is not finite or outside
  ``[low, high]``. Unset (None) flags are skipped."""
  for name in at_least_1:
    if values[name].value is not None and values[name].value < 1:
      raise app.UsageError(f"--{name}={values[name].value} must be at least 1.")
  for name in at_least_0:
    if values[name].value is not None and values[name].value < 0:
      raise app.UsageError(f"--{name}={values[name].value} must be 0 or more.")
  for name, (lo, hi, lo_open) in (ranges or {}).items():
    v = values[name].value
    if v is None:
      continue
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
      bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
      raise app.UsageError(f"--{name}={v} must be a finite number {bound}.")


def parse_flags(argv: list[str],
                parser: Callable[[list[str]], list[str]] | None = None) -> list[str]:
  """``parser(argv)`` (default: absl's ``flags.FLAGS(argv)``) with a user error (a flag error,
  or a MoeEdgeError the parser raises, e.g. an unknown config key) printed as one usage line,
  exit 2."""
  try:
    return (parser or flags.FLAGS)(list(argv))
  except Exception as e:  # noqa: BLE001 (re-raised unless it is a user error)
    if is_user_error(e):
      _fail(_script_name(argv), e)
    raise


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """``main`` with user errors turned into one usage line and exit code 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 (re-raised unless it is a user error)
      if is_user_error(e):
        _fail(_script_name(argv or sys.argv), e)
      raise

  return wrapped


def run(main: Callable[[list[str]], object],
        parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """``app.run(main)`` with one-line usage errors (see the module docstring); ``parser``
  replaces absl's flag parsing (experiments/_cli.py passes its config-file parser)."""
  app.run(guarded(main), flags_parser=lambda argv: parse_flags(argv, parser))


def invoke(main: Callable[[list[str]], object], argv: Sequence[str],
           parser: Callable[[list[str]], list[str]] | None = None) -> int:
  """Parse ``argv`` into absl's FLAGS and call ``main`` as :func:`run` would; return the exit
  code (0 when ``main`` returns normally). Flags are reset before parsing, and ``sys.argv`` is
  ``argv`` meanwhile (``ml_collections`` config flags read their overrides off it)."""
  flags.FLAGS.unparse_flags()
  saved = sys.argv
  sys.argv = list(argv)
  try:
    rest = parse_flags(list(argv), parser)
    guarded(main)(rest)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = saved
  return 0
