"""Minimal variants of the migration copy program, each in its own process (GPU crash hunt).

  python benchmarks/gpu_copy_repro.py            # runs every variant in a subprocess
"""
import os
import subprocess
import sys

VARIANTS = ["plain_oneway", "plain_swap", "drop_scatter", "clip_scatter", "table_index",
            "vma_on", "f32"]


def run(variant):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  n = 2
  mesh = Mesh(np.array(jax.devices()[:n]), ("server",))
  s_old, s_new, d, f = 4, 5, 64, 32
  dt = jnp.float32 if variant == "f32" else jnp.bfloat16
  x = jax.device_put(jnp.arange(n * s_old * d * f, dtype=jnp.float32).reshape(n, s_old, d, f)
                     .astype(dt), jax.sharding.NamedSharding(mesh, P("server")))
  perm = [(0, 1), (1, 0)] if variant == "plain_swap" else [(0, 1)]
  send_tab = np.array([[1, 2], [0, 3]], np.int32)
  recv_tab = np.array([[5, 5], [4, 5]], np.int32)  # 5 = out of range (dropped)

  def body(v):
    v = v[0]
    me = jax.lax.axis_index("server")
    if variant == "table_index" or variant.endswith("scatter") or variant in ("vma_on", "f32"):
      src = jnp.asarray(send_tab)[me]
      dst = jnp.asarray(recv_tab)[me]
    else:
      src = jnp.array([1, 2])
      dst = jnp.array([4, 3])
    got = jax.lax.ppermute(v[src], "server", perm)
    new = jnp.zeros((s_new, d, f), v.dtype).at[:s_old].set(v)
    mode = "clip" if variant == "clip_scatter" else "drop"
    new = new.at[dst].set(got, mode=mode)
    return new[None]

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("server"), out_specs=P("server"),
                             check_vma=(variant == "vma_on")))
  y = fn(x)
  print(variant, "OK", float(jnp.abs(y.astype(jnp.float32)).sum()))


if __name__ == "__main__":
  if len(sys.argv) > 1:
    run(sys.argv[1])
  else:
    for v in VARIANTS:
      p = subprocess.run([sys.executable, "-X", "faulthandler", __file__, v], capture_output=True,
                         text=True, timeout=90)
      tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
      print(f"{v}: exit {p.returncode}: {tail[0][:200]}", flush=True)
