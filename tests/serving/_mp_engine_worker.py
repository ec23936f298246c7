"""One process of the multi-process engine test (launched by test_engine_multiprocess.py).

Every process builds the same tiny model, placement and requests from seeds, joins
``jax.distributed`` over CPU devices and serves the requests with the engine over the global
``server`` mesh; each checks every request's tokens (they come back replicated) against the
single-device cached model on its own first device. Prints ``OK <process_id> ...``.

Usage: python _mp_engine_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES
"""
import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, LOCAL = (int(a) for a in sys.argv[1:5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES,
                           process_id=PROCESS_ID, initialization_timeout=60,
                           heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

from flax import nnx  # noqa: E402

from moe_edge.config import cluster_config, model_config  # noqa: E402
from moe_edge.model.transformer import MoETransformer  # noqa: E402
from moe_edge.parallel.mesh import server_mesh  # noqa: E402
from moe_edge.parallel.runtime import ServingRuntime  # noqa: E402
from moe_edge.placement.problem import Placement  # noqa: E402
from moe_edge.serving.engine import Engine  # noqa: E402
from moe_edge.serving.report import single_device_tokens  # noqa: E402
from moe_edge.serving.scheduler import SchedulerOptions  # noqa: E402
from moe_edge.serving.step_cost import StepCost  # noqa: E402
from moe_edge.workload.requests import make_requests  # noqa: E402


def main():
  n = NUM_PROCESSES * LOCAL
  assert jax.device_count() == n and jax.local_device_count() == LOCAL
  cfg = model_config("tiny")
  cluster = cluster_config("homogeneous_4", num_servers=n)
  model = MoETransformer(cfg, nnx.Rngs(jax.random.key(0, impl="rbg")))
  l, e = cfg.n_moe_layers, cfg.n_experts
  rng = np.random.default_rng(7)
  hosts = rng.random((n, l, e)) < 0.35
  hosts[rng.integers(n, size=(l, e)), np.arange(l)[:, None], np.arange(e)[None, :]] = True
  rt = ServingRuntime(server_mesh(n), model, Placement.from_hosts(hosts, cfg, cluster),
                      num_slots=e)
  engine = Engine(rt, model, SchedulerOptions(max_batch=2, token_budget=10, prefill_chunk=8,
                                              kv_tokens=60), cost=StepCost(cfg, cluster))
  requests = make_requests(n, (3, 12), (2, 5), seed=1, rate=100.0, requests_per_server=1)
  res = engine.serve(requests, clock="virtual")
  with jax.default_device(jax.local_devices()[0]):
    want = single_device_tokens(model, requests)
  for i, w in enumerate(want):
    np.testing.assert_array_equal(res.tokens[i], w, err_msg=f"request {i}")
  assert res.dispatch_bytes == res.cost_bytes and sum(res.dispatch_bytes) > 0
  print(f"OK {PROCESS_ID} served {len(requests)} requests in {len(res.loop.steps)} steps on "
        f"{jax.local_device_count()} local devices of {jax.device_count()}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
