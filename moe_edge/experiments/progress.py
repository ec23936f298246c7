"""A plain progress display on stderr: ``[####----] 12/40  30%  0:12 elapsed, ~0:28 left  what``.

On a terminal the line is redrawn in place (carriage return); otherwise (a log file, a pipe,
pytest's capture) each update is a line of its own. No dependencies beyond the standard library.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from moe_edge.config import ConfigError


def _clock(seconds: float) -> str:
  seconds = int(round(max(seconds, 0.0)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Counts finished units of work and shows how many are left.

  Args:
    total: units expected (may grow with :meth:`add`).
    label: shown before the bar.
    stream: where to write (default ``sys.stderr``).
    enabled: False turns every call into a no-op.
    width: characters of the bar.
  """

  def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
               enabled: bool = True, width: int = 24):
    if total < 0:
      raise ConfigError(f"total must be >= 0, got {total}.")
    self.total, self.done, self.label, self.width = int(total), 0, label, width
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled
    self.start = time.perf_counter()
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._open_line = False

  def add(self, units: int) -> None:
    """Expect ``units`` more units of work."""
    self.total += int(units)

  def update(self, what: str = "", units: int = 1) -> None:
    """Mark ``units`` units done, the last one being ``what``."""
    self.done += int(units)
    self._draw(what)

  def note(self, message: str) -> None:
    """Write a message on its own line (keeps the bar below it on a terminal)."""
    if not self.enabled:
      return
    if self._open_line:
      self.stream.write("\n")
      self._open_line = False
    self.stream.write(f"{message}\n")
    self.stream.flush()

  def close(self) -> None:
    """Finish the display (a newline after an in-place bar)."""
    if self.enabled and self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False

  def line(self, what: str = "") -> str:
    """The text of the display now."""
    total = max(self.total, self.done, 1)
    frac = self.done / total
    filled = int(round(frac * self.width))
    elapsed = time.perf_counter() - self.start
    left = elapsed * (total - self.done) / self.done if self.done else float("nan")
    eta = f", ~{_clock(left)} left" if self.done and self.done < total else ""
    head = f"{self.label} " if self.label else ""
    return (f"{head}[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{total} "
            f"{100 * frac:3.0f}%  {_clock(elapsed)} elapsed{eta}  {what}").rstrip()

  def _draw(self, what: str) -> None:
    if not self.enabled:
      return
    text = self.line(what)
    if self._tty:
      self.stream.write("\r\033[K" + text)
      self._open_line = True
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
