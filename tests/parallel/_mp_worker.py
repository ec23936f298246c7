"""One process of the multi-process dispatch test (launched by test_multiprocess.py).

Every process builds the same global problem from a seed (placement, weights, tokens, routing),
joins ``jax.distributed`` over CPU devices, runs the distributed MoE layer over the global
``server`` mesh and checks the rows on its own devices against a numpy reference. Prints
``OK <process_id> ...`` and exits 0 on success; any mismatch raises (non-zero exit).

Usage: python _mp_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES
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

from moe_edge.config import cluster_config, model_config  # noqa: E402
from moe_edge.parallel import dispatch, mesh  # noqa: E402
from moe_edge.placement.problem import Placement  # noqa: E402


def numpy_layer(x, ids, gates, wg, wu, wd):
  """sum_r gates[t, r] * SwiGLU_{ids[t, r]}(x[t]) by plain loops."""
  out = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    for r in range(ids.shape[1]):
      e = ids[t, r]
      a, b = x[t] @ wg[e], x[t] @ wu[e]
      out[t] += gates[t, r] * ((a / (1 + np.exp(-a)) * b) @ wd[e])
  return out


def main():
  n = NUM_PROCESSES * LOCAL
  assert jax.device_count() == n and jax.local_device_count() == LOCAL
  model = model_config("tiny")
  cluster = cluster_config("homogeneous_4", num_servers=n)
  l, e, d, f, k = (model.n_moe_layers, model.n_experts, model.d_model, model.d_ff_expert,
                   model.top_k)
  rng = np.random.default_rng(7)
  hosts = rng.random((n, l, e)) < 0.35
  hosts[rng.integers(n, size=(l, e)), np.arange(l)[:, None], np.arange(e)[None, :]] = True
  tables = mesh.tables_from_placement(Placement.from_hosts(hosts, model, cluster), model=model)
  w = dict(w_gate=rng.normal(0, 0.3, (l, e, d, f)), w_up=rng.normal(0, 0.3, (l, e, d, f)),
           w_down=rng.normal(0, 0.3, (l, e, f, d)))
  w = {key: v.astype(np.float32) for key, v in w.items()}
  t = 6
  x = rng.normal(size=(n * t, d)).astype(np.float32)
  ids = np.argsort(rng.random((n * t, e)), axis=1)[:, :k].astype(np.int32)
  gates = rng.random((n * t, k)).astype(np.float32)
  mask = rng.random(n * t) < 0.8

  m = mesh.server_mesh(n)
  slots = mesh.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, m)
  checked = 0
  for layer in range(l):
    fn = dispatch.make_moe_dispatch(m, tables, layer, transport="padded")
    y, stats = fn(x, ids, gates, *(slots[name][:, layer] for name in mesh.WEIGHT_NAMES),
                  mask=mask)
    want = numpy_layer(x, ids, gates * mask[:, None], w["w_gate"][layer], w["w_up"][layer],
                       w["w_down"][layer])
    for shard in y.addressable_shards:
      rows = shard.index[0]
      np.testing.assert_allclose(np.asarray(shard.data), want[rows], rtol=1e-5, atol=1e-5)
      checked += 1
    np.testing.assert_array_equal(np.asarray(stats.send_rows),
                                  dispatch.send_counts(tables, layer, ids, mask))
  print(f"OK {PROCESS_ID} checked {checked} shards on {jax.local_device_count()} local devices "
        f"of {jax.device_count()}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
