"""Test set-up: 8 host CPU devices (set before JAX initialises) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import moe_edge  # noqa: E402,F401  (first: pins OpenBLAS' kernel before numpy loads, _blas.py)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """``../shared/data`` (real corpus and routing statistics); the tests need it."""
  assert SHARED_DATA.is_dir(), f"expected the shared data at {SHARED_DATA}"
  return SHARED_DATA


_SCRIPT_FLAGS: dict[str, list[str]] = {}


def load_script(name: str):
  """Import ``experiments/<name>.py`` (or ``<name>.py`` for a path such as
  ``benchmarks/bench_cost``) afresh as a module, to call its functions or ``main``.

  absl flags are process-global and several scripts define the same names (``--seed``), so
  the flags that earlier loaded scripts defined are removed before this one defines its own.
  """
  import importlib.util  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  for owner in list(_SCRIPT_FLAGS):
    for flag in _SCRIPT_FLAGS.pop(owner):
      if flag in flags.FLAGS:
        delattr(flags.FLAGS, flag)
  import sys  # noqa: PLC0415
  before = set(flags.FLAGS)
  path = REPO / f"{name}.py" if "/" in name else REPO / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"script_{Path(name).name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses defined in a script look their module up
  if str(path.parent) not in sys.path:  # as `python experiments/x.py` does (import _cli)
    sys.path.insert(0, str(path.parent))
  spec.loader.exec_module(module)
  _SCRIPT_FLAGS[name] = sorted(set(flags.FLAGS) - before)
  return module


def run_processes(worker: Path, timeout_s: float, num_processes: int = 2,
                  local_devices: int = 2) -> list[tuple[int, str]]:
  """Run ``worker`` as ``num_processes`` processes joined by ``jax.distributed`` on a free
  loopback port (argv: process id, process count, port, local devices); ``[(exit code,
  output)]`` per process. Processes still running at the timeout are killed."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(num_processes), str(port),
                             str(local_devices)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
           for i in range(num_processes)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout_s)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return [(p.returncode, out) for p, out in zip(procs, outputs)]
