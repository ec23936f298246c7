"""Two processes on this machine, 2 CPU devices each, joined by ``jax.distributed``: the engine
serves requests over the global 4-device ``server`` mesh and every process sees every request's
tokens equal to the single-device cached model's (the worker is ``_mp_engine_worker.py``)."""
from pathlib import Path

from conftest import run_processes

WORKER = Path(__file__).with_name("_mp_engine_worker.py")
TIMEOUT_S = 180


def test_engine_across_two_processes_equals_single_device():
  for i, (code, out) in enumerate(run_processes(WORKER, TIMEOUT_S)):
    assert code == 0, f"process {i} failed (exit {code}):\n{out[-4000:]}"
    assert f"OK {i} served 4 requests" in out and "on 2 local devices of 4" in out, out[-4000:]
