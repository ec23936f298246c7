"""Importance-driven substitution and local-preferring top-k: numpy references, the model hooks
(bitwise unchanged when off, only substituted tokens change when on), and composition with the
distributed dispatch on 8 host CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import cluster_config, model_config
from moe_edge.extensions import substitution as sub_lib
from moe_edge.extensions.transform import TransformError, TransformedMoE, identity_transform
from moe_edge.model.transformer import MoETransformer, expert_weights
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel import mesh as mesh_lib
from moe_edge.placement.problem import Placement

TINY = model_config("tiny")
L, E, K = TINY.n_moe_layers, TINY.n_experts, TINY.top_k
N, B, S = 8, 8, 8  # 8 servers (one host CPU device each), one batch row per server


# ---- numpy references ------------------------------------------------------------------------
def np_substitute(ids, gates, server, hosts, sim, threshold):
  ids = ids.copy()
  mask = np.zeros(ids.shape, bool)
  for t in range(ids.shape[0]):
    local = hosts[server[t]]
    taken = set(ids[t].tolist())
    for r in range(ids.shape[1]):
      if local[ids[t, r]] or not gates[t, r] < threshold:
        continue
      cands = [e for e in range(hosts.shape[1]) if local[e] and e not in taken]
      if not cands:
        continue
      best = max(cands, key=lambda e: (sim[ids[t, r], e], -e))  # first maximum wins
      ids[t, r] = best
      taken.add(best)
      mask[t, r] = True
  return ids, mask


def np_prefer_local(probs, server, hosts, k, tol, norm):
  ids = np.zeros((probs.shape[0], k), np.int64)
  for t in range(probs.shape[0]):
    chosen = []
    for r in range(k):
      rest = [e for e in range(probs.shape[1]) if e not in chosen]
      best = max(rest, key=lambda e: (probs[t, e], -e))
      local = [e for e in rest if hosts[server[t], e]]
      if not hosts[server[t], best] and local:
        lb = max(local, key=lambda e: (probs[t, e], -e))
        if probs[t, lb] > (1 - tol) * probs[t, best]:
          best = lb
      chosen.append(best)
    ids[t] = chosen
  g = np.take_along_axis(probs, ids, axis=1)
  return ids, (g / g.sum(1, keepdims=True) if norm else g)


def random_case(rng, t=200, n=4, e=E, k=K, density=0.35):
  hosts = rng.random((n, e)) < density
  ids = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
  gates = rng.random((t, k)).astype(np.float32)
  server = rng.integers(0, n, t).astype(np.int32)
  sim = rng.uniform(-1, 1, (e, e)).astype(np.float32)
  return ids, gates, server, hosts, sim


# ---- the pure functions ------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.01])
def test_substitute_matches_numpy_and_is_safe(threshold):
  rng = np.random.default_rng(int(threshold * 100))
  ids, gates, server, hosts, sim = random_case(rng, k=3)
  new, g, mask = jax.jit(sub_lib.substitute)(ids, gates, server, hosts, sim, threshold)
  new, g, mask = np.asarray(new), np.asarray(g), np.asarray(mask)
  want_ids, want_mask = np_substitute(ids, gates, server, hosts, sim, threshold)
  np.testing.assert_array_equal(new, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(g, gates)  # gates are inherited, never renormalised
  assert all(len(set(row)) == ids.shape[1] for row in new.tolist())  # no duplicate experts
  local_new = hosts[server[:, None], new]
  local_old = hosts[server[:, None], ids]
  assert np.all(local_new[mask]) and not np.any(local_old[mask])  # remote -> local only
  assert not np.any(mask & (gates >= threshold))  # important choices untouched
  np.testing.assert_array_equal(new[~mask], ids[~mask])
  if threshold == 0.0:
    assert not mask.any()
  if threshold > 1.0:  # a remote choice stays only when every local expert is already in use
    for t in np.flatnonzero((~mask & ~local_old).any(1)):
      assert set(np.flatnonzero(hosts[server[t]])) <= set(ids[t]) | set(new[t])


def test_scaled_gates_and_drop_control():
  rng = np.random.default_rng(11)
  ids, gates, server, hosts, sim = random_case(rng, k=3)
  new, g, mask = (np.asarray(a) for a in sub_lib.substitute(ids, gates, server, hosts, sim, 0.6,
                                                            scale_gates=True))
  want = np.where(mask, gates * np.clip(sim[ids, new], 0, 1), gates)
  np.testing.assert_allclose(g, want, rtol=1e-6)
  # drop_remote: exactly the remote choices below the threshold lose their gate, the rest are
  # renormalised to the original mass; dropped choices are parked on unused local experts.
  d_ids, d_g, drop = (np.asarray(a) for a in sub_lib.drop_remote(ids, gates, server, hosts, 0.6))
  remote = ~hosts[server[:, None], ids]
  np.testing.assert_array_equal(drop, remote & (gates < 0.6))
  kept = np.where(drop, 0, gates)
  scale = np.where(kept.sum(1) > 0, gates.sum(1) / np.where(kept.sum(1) > 0, kept.sum(1), 1), 0)
  np.testing.assert_allclose(d_g, kept * scale[:, None], rtol=1e-5)
  assert all(len(set(row)) == 3 for row in d_ids.tolist())
  moved = d_ids != ids
  assert np.all(drop[moved]) and np.all(hosts[server[:, None], d_ids][moved])


def test_substitute_respects_min_similarity_and_empty_servers():
  rng = np.random.default_rng(1)
  ids, gates, server, hosts, sim = random_case(rng)
  hosts[0] = False  # server 0 hosts nothing in this layer: nothing to substitute with
  new, _, mask = sub_lib.substitute(ids, gates, server, hosts, sim, 2.0, min_similarity=0.5)
  mask, new = np.asarray(mask), np.asarray(new)
  assert not mask[server == 0].any()
  assert np.all(sim[ids[mask], new[mask]] >= 0.5)


@pytest.mark.parametrize("tol", [0.0, 0.2, 0.6, 1.0])
def test_prefer_local_matches_numpy(tol):
  rng = np.random.default_rng(2)
  _, _, server, hosts, _ = random_case(rng)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(200, E)) * 2.0), axis=-1))
  ids, gates = sub_lib.prefer_local(jnp.asarray(probs), server, hosts, K, tol, True)
  want_ids, want_g = np_prefer_local(probs, server, hosts, K, tol, True)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(gates), want_g, rtol=1e-6)
  if tol == 0.0:
    top_g, top = jax.lax.top_k(jnp.asarray(probs), K)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(top))
  if tol == 1.0:  # a local expert always wins when one is left
    n_local = hosts[server].sum(1)
    loc = hosts[server[:, None], np.asarray(ids)]
    assert np.all(loc.sum(1) == np.minimum(n_local, K))


# ---- inside the model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  model = MoETransformer(TINY, nnx.Rngs(0))
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, TINY.vocab_size, (B, S)).astype(np.int32)
  hosts = rng.random((N, L, E)) < 0.3
  for l, e in np.argwhere(~hosts.any(axis=0)):
    hosts[rng.integers(N), l, e] = True
  sim = rng.uniform(-1, 1, (L, E, E)).astype(np.float32)
  server = (np.arange(B) // (B // N)).astype(np.int32)
  return model, tokens, hosts, sim, server


@nnx.jit(static_argnames=("kind",))
def _run(model, tokens, hosts, sim, server, knob, kind):
  """Logits and records of the model with a transform built inside the jitted function."""
  if kind == "substitute":
    fn = sub_lib.substitution_moe_fn(hosts, sim, server, knob, record=True)
  elif kind == "prefer_local":
    fn = sub_lib.local_preference_moe_fn(sub_lib.router_weights(model), hosts, server, K, knob,
                                         TINY.norm_topk_prob, record=True)
  else:
    fn = TransformedMoE(identity_transform, record=True)
  logits, _ = model(tokens, moe_fn=fn)
  return logits, fn.stacked()


@nnx.jit
def _plain(model, tokens):
  return model(tokens)[0]


def test_off_is_bitwise_unchanged(tiny):
  model, tokens, hosts, sim, server = tiny
  want = np.asarray(_plain(model, tokens))
  for kind in ("substitute", "prefer_local"):
    logits, rec = _run(model, tokens, hosts, sim, server, 0.0, kind)
    np.testing.assert_array_equal(np.asarray(logits), want)
    assert not np.asarray(rec["changed"]).any()


def test_only_substituted_tokens_change(tiny):
  model, tokens, hosts, sim, server = tiny
  _, base = _run(model, tokens, hosts, sim, server, 0.0, "identity")
  logits, rec = _run(model, tokens, hosts, sim, server, 0.45, "substitute")
  changed = np.asarray(rec["changed"])  # [B, S, L, k]
  assert changed[..., 0, :].any() and not changed[..., 0, :].all()
  # First MoE layer: same input x for both runs, so the per-token output differs exactly where a
  # choice of that token was substituted.
  np.testing.assert_array_equal(np.asarray(rec["x"][:, :, 0]), np.asarray(base["x"][:, :, 0]))
  y, y0 = np.asarray(rec["y"][:, :, 0]), np.asarray(base["y"][:, :, 0])
  hit = changed[:, :, 0].any(-1)
  np.testing.assert_array_equal(y[~hit], y0[~hit])
  assert np.all(np.abs(y[hit] - y0[hit]).max(-1) > 0)
  # The recorded routing is the substitution of the router's own routing at every layer.
  ids_in, g_in = np.asarray(rec["expert_ids_in"]), np.asarray(rec["gates_in"])
  for l in range(L):
    srv = np.repeat(server, S)
    want, mask = np_substitute(ids_in[:, :, l].reshape(-1, K), g_in[:, :, l].reshape(-1, K), srv,
                               hosts[:, l], sim[l], 0.45)
    np.testing.assert_array_equal(np.asarray(rec["expert_ids"][:, :, l]).reshape(-1, K), want)
    np.testing.assert_array_equal(changed[:, :, l].reshape(-1, K), mask)
  assert not np.array_equal(np.asarray(logits), np.asarray(_plain(model, tokens)))


def test_composes_with_distributed_dispatch(tiny):
  """Substitution, then the shard_map dispatch over 8 devices == substitution, then the dense
  single-device reference."""
  model, tokens, hosts, sim, server = tiny
  assert len(jax.devices()) >= N
  placement = Placement.from_hosts(hosts, TINY, cluster_config("homogeneous_4", num_servers=N))
  mesh = mesh_lib.server_mesh(N)
  tables = mesh_lib.tables_from_placement(placement, num_slots=E, model=TINY)
  w = expert_weights(model)
  sw = mesh_lib.shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, mesh)
  dist = dispatch_lib.distributed_moe_fn(mesh, tables, sw)

  def forward(base):
    @nnx.jit
    def run(m, tok):
      fn = sub_lib.substitution_moe_fn(hosts, sim, server, 0.45, moe_fn=base, record=True)
      return m(tok, moe_fn=fn)[0], fn.stacked()["changed"]
    return run

  want, changed = forward(None)(model, jnp.asarray(tokens))
  got, changed_d = forward(dist)(model, mesh_lib.shard_rows(tokens, mesh))
  assert np.asarray(changed).any()
  np.testing.assert_array_equal(np.asarray(changed_d), np.asarray(changed))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(tiny):
  model, tokens, hosts, sim, server = tiny
  with pytest.raises(TransformError, match=r"sim \[L, E, E\]"):
    sub_lib.substitution_transform(hosts, sim[0], server, 0.5)
  fn = sub_lib.substitution_moe_fn(hosts[:, :, :4], sim[:, :4, :4], server, 0.5)
  with pytest.raises(TransformError, match="another model"):
    model(jnp.asarray(tokens), moe_fn=fn)
  fn = sub_lib.substitution_moe_fn(hosts, sim, server[:3], 0.5)
  with pytest.raises(TransformError, match=r"server must be a scalar, \[B\]"):
    model(jnp.asarray(tokens), moe_fn=fn)
