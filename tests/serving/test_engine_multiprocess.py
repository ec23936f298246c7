"""Two processes on this machine, 2 CPU devices each, joined by ``jax.distributed``: the engine
serves requests over the global 4-device ``server`` mesh and every process sees every request's
tokens equal to the single-device cached model's (the worker is ``_mp_engine_worker.py``)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_mp_engine_worker.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_engine_across_two_processes_equals_single_device():
  port, num_processes, local = _free_port(), 2, 2
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(num_processes), str(port),
                             str(local)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO)
           for i in range(num_processes)]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outputs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed (exit {p.returncode}):\n{out[-4000:]}"
    assert f"OK {i} served 4 requests" in out and "on 2 local devices of 4" in out, out[-4000:]
