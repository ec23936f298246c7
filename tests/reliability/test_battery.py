"""The hostile-input battery: every line of cases.txt is one test (see the header of cases.txt).

In-process ``main`` and ``call`` cases share one session of built hostile inputs and the already
imported JAX, so the battery costs seconds; only ``run`` cases start a Python process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_edge.core.errors import MoeEdgeError
from moe_edge.core.problem import Placement
from moe_edge.core.routing_stats import RoutingStats
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.calibrate import Calibration
from moe_edge.workload.requests import Requests
from moe_edge.io import cli
from moe_edge.model import checkpoint as ckpt
from conftest import REPO, load_script
import hostile_files  # noqa: F401  (registers the trace, placement, stats, ... builders)
from hostile import Hostile

HERE = Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\{(\w+)\}")

# Library calls a ``call`` case can name; every argument arrives as a string.
CALLS = {
    "restore_checkpoint": lambda path, cfg=None: ckpt.restore_checkpoint(path, cfg),
    "import_safetensors": lambda path, cfg, scheme: ckpt.import_hf_safetensors(path, cfg,
                                                                               scheme),
    "load_placement": lambda path: Placement.load(path),
    "load_trace": lambda path: ActivationTrace.load(path),
    "load_routing_stats": lambda path: RoutingStats.load(path),
    "load_calibration": lambda path: Calibration.load(path),
    "load_requests": lambda path: Requests.load(path),
}


def parse_cases(path: Path) -> list[tuple[str, str, str, str, int]]:
  """``(kind, target, arguments, fragment, line number)`` of every case line."""
  out = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    parts = [p.strip() for p in line.split("|", 3)]
    if len(parts) != 4 or parts[0] not in ("main", "run", "call") or not parts[3]:
      raise ValueError(f"{path.name}:{i}: a case is 'KIND | TARGET | ARGUMENTS | FRAGMENT' "
                       f"with KIND main, run or call: {line!r}")
    out.append((*parts, i))
  return out


CASES = parse_cases(HERE / "cases.txt")


@pytest.fixture(scope="session")
def hostile(tmp_path_factory):
  return Hostile(tmp_path_factory.mktemp("hostile"))


def expand(args: str, hostile: Hostile, tmp: Path) -> list[str]:
  def sub(m):
    return str(tmp) if m.group(1) == "tmp" else str(hostile.build(m.group(1)))
  return [PLACEHOLDER.sub(sub, a) for a in args.split()]


def check_usage_error(script: str, code: int, stderr: str, fragment: str) -> None:
  assert code == cli.USAGE_EXIT, f"exit code {code}, stderr:\n{stderr}"
  assert "Traceback" not in stderr, stderr
  lines = [l for l in stderr.splitlines() if l.startswith(f"{script}.py: error: ")]
  assert len(lines) == 1, f"expected one '{script}.py: error:' line in:\n{stderr}"
  assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("kind,target,args,fragment,line", CASES,
                         ids=[f"{c[4]}-{c[0]}-{c[1]}" for c in CASES])
def test_case(kind, target, args, fragment, line, hostile, tmp_path, capsys):
  argv = expand(args, hostile, tmp_path)
  if kind == "call":
    with pytest.raises(MoeEdgeError) as info:
      CALLS[target](*argv)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert fragment in msg, f"{fragment!r} not in {msg!r}"
  elif kind == "main":
    module = load_script(target)
    script = Path(target).name
    capsys.readouterr()
    # A config script parses --config.KEY overrides with its experiments/_cli.py.
    invoke = module._cli.invoke if hasattr(module, "CONFIG") else cli.invoke
    code = invoke(module.main, [f"{script}.py", *argv])
    check_usage_error(script, code, capsys.readouterr().err, fragment)
  else:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    path = REPO / f"{target}.py" if "/" in target else REPO / "experiments" / f"{target}.py"
    proc = subprocess.run([sys.executable, str(path), *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    check_usage_error(Path(target).name, proc.returncode, proc.stderr, fragment)
