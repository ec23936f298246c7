"""Two processes on this machine, 2 CPU devices each, joined by ``jax.distributed``: the
distributed MoE layer over the global 4-device ``server`` mesh matches a numpy reference on every
process's own shards (the worker is ``_mp_worker.py``)."""
from pathlib import Path

from conftest import run_processes

WORKER = Path(__file__).with_name("_mp_worker.py")
TIMEOUT_S = 150


def test_two_processes_match_reference():
  for i, (code, out) in enumerate(run_processes(WORKER, TIMEOUT_S)):
    assert code == 0, f"process {i} failed (exit {code}):\n{out[-4000:]}"
    assert f"OK {i} checked 4 shards on 2 local devices of 4" in out, out[-4000:]
