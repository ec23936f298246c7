"""Budgeted expert selection: exact solver vs brute force over every replica assignment, greedy vs
exact (never better, equal where it provably must be), monotone kept mass, costs from the
cluster, and the transform inside the model."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import cluster_config, model_config
from moe_edge.extensions import budgeted as bud
from moe_edge.extensions.budgeted import BudgetError, EnergyModel
from moe_edge.model.transformer import MoETransformer
from moe_edge.placement.problem import link_time_per_token

TINY = model_config("tiny")
L, E, K = TINY.n_moe_layers, TINY.n_experts, TINY.top_k
N = 4

exact = jax.jit(bud.solve_exact, static_argnames=("force_top1",))
greedy = jax.jit(bud.solve_greedy, static_argnames=("force_top1", "best_single"))


def random_instance(rng, t, k, n=N, e=8):
  """Tokens with distinct choices, random placement (every expert somewhere), random costs."""
  hosts = rng.random((n, e)) < 0.4
  hosts[rng.integers(0, n, e), np.arange(e)] = True
  ids = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
  gates = np.sort(rng.random((t, k)), axis=1)[:, ::-1].astype(np.float32)
  server = rng.integers(0, n, t).astype(np.int32)
  cm = rng.uniform(0.1, 1.0, (n, n))
  cm[np.arange(n), np.arange(n)] = rng.uniform(0.01, 0.2, n)
  return ids, gates, server, hosts, cm.astype(np.float32)


def brute_force(ids, gates, server, hosts, cm, budget, force_top1):
  """Best kept mass over every assignment (drop, or run on any holder) of every choice."""
  best = np.zeros(ids.shape[0])
  for t in range(ids.shape[0]):
    options = [[None] + list(np.flatnonzero(hosts[:, e])) for e in ids[t]]
    top = -1.0
    for assign in itertools.product(*options):
      if force_top1 and assign[0] is None:
        continue
      cost = sum(float(cm[server[t], m]) for m in assign if m is not None)
      forced_only = force_top1 and all(m is None for m in assign[1:])
      if cost > budget[t] + 1e-6 and not forced_only:
        continue
      top = max(top, sum(float(g) for g, m in zip(gates[t], assign) if m is not None))
    best[t] = top
  return best


@pytest.mark.parametrize("k,force", [(1, False), (2, False), (3, False), (3, True), (4, True)])
def test_exact_equals_brute_force(k, force):
  rng = np.random.default_rng(k + 10 * force)
  ids, gates, server, hosts, cm = random_instance(rng, 60, k)
  budget = rng.uniform(0.0, 2.0, 60).astype(np.float32)
  sel = bud.budgeted_selection(ids, gates, server, hosts, cm, budget, "exact", force)
  keep, cost, rep = np.asarray(sel.keep), np.asarray(sel.cost), np.asarray(sel.replica)
  mass = np.where(keep, gates, 0).sum(1)
  np.testing.assert_allclose(mass, brute_force(ids, gates, server, hosts, cm, budget, force),
                             atol=1e-6)
  over = cost.sum(1) > budget + 1e-6
  if force:
    assert keep[:, 0].all()
    assert not keep[over, 1:].any()  # over budget only by the forced top-1 alone
  else:
    assert not over.any()
  assert np.all(hosts[rep[keep], ids[keep]])  # a kept choice runs on a holder
  np.testing.assert_allclose(cost[keep], cm[np.broadcast_to(server[:, None], keep.shape)[keep],
                                            rep[keep]])


def test_greedy_never_beats_exact_and_misses_somewhere():
  rng = np.random.default_rng(0)
  gaps = []
  for k in (3, 4, 6):
    gates = rng.random((400, k)).astype(np.float32)
    cost = rng.uniform(0.05, 1.0, (400, k)).astype(np.float32)
    budget = rng.uniform(0.0, k * 0.5, 400).astype(np.float32)
    m_exact = np.where(np.asarray(exact(gates, cost, budget)), gates, 0).sum(1)
    kg = np.asarray(greedy(gates, cost, budget))
    assert np.all(np.where(kg, cost, 0).sum(1) <= budget + 1e-6)
    m_greedy = np.where(kg, gates, 0).sum(1)
    assert np.all(m_greedy <= m_exact + 1e-6)
    assert np.all(m_greedy >= 0.5 * m_exact - 1e-6)  # modified greedy: half the optimum
    gaps.append(np.mean(m_greedy < m_exact - 1e-6))
  assert max(gaps) > 0  # not exact in general: the exactness tests below are not vacuous


def test_greedy_is_exact_where_it_must_be():
  rng = np.random.default_rng(1)
  t = 500
  for k, force in ((2, False), (3, True), (5, False), (5, True)):
    gates = rng.random((t, k)).astype(np.float32)
    cost = rng.uniform(0.05, 1.0, (t, k)).astype(np.float32)
    budget = rng.uniform(0.0, k * 0.6, t).astype(np.float32)
    unit = np.full((t, k), 0.3, np.float32)
    cases = [(unit, budget),                              # equal costs
             (cost, cost.sum(1) + 0.01)]                  # everything fits
    if k - force <= 2:
      cases.append((cost, budget))                        # at most two free items
    for c, b in cases:
      m_e = np.where(np.asarray(exact(gates, c, b, force)), gates, 0).sum(1)
      m_g = np.where(np.asarray(greedy(gates, c, b, force)), gates, 0).sum(1)
      np.testing.assert_allclose(m_g, m_e, atol=1e-6)
  # Without the best-single check the greedy by ratio is not exact even for two items.
  g, c, b = np.array([[0.3, 0.7]], np.float32), np.array([[1.0, 3.0]], np.float32), 3.0
  plain = np.asarray(bud.solve_greedy(g, c, b, best_single=False))
  np.testing.assert_array_equal(plain, [[True, False]])
  np.testing.assert_array_equal(np.asarray(bud.solve_greedy(g, c, b)), [[False, True]])


def test_exact_kept_mass_is_monotone_in_budget():
  rng = np.random.default_rng(2)
  gates = rng.random((300, 4)).astype(np.float32)
  cost = rng.uniform(0.05, 1.0, (300, 4)).astype(np.float32)
  prev = np.full(300, -1.0)
  for b in np.linspace(0.0, 4.0, 17):
    for force in (False, True):
      m = np.where(np.asarray(exact(gates, cost, np.float32(b), force)), gates, 0).sum(1)
      if not force:
        assert np.all(m >= prev - 1e-6)
        prev = m
  np.testing.assert_allclose(prev, gates.sum(1), rtol=1e-6)  # a large budget keeps everything


def test_selection_gates_parking_and_renormalisation():
  rng = np.random.default_rng(3)
  ids, gates, server, hosts, cm = random_instance(rng, 200, 3)
  for renorm in (False, True):
    sel = bud.budgeted_selection(ids, gates, server, hosts, cm, 0.5, "greedy", False, renorm)
    keep, g, new = np.asarray(sel.keep), np.asarray(sel.gates), np.asarray(sel.expert_ids)
    assert np.all(g[~keep] == 0)
    assert all(len(set(row)) == 3 for row in new.tolist())  # parking never duplicates
    np.testing.assert_array_equal(new[keep], ids[keep])
    parked = ~keep & (new != ids)
    assert np.all(hosts[np.broadcast_to(server[:, None], new.shape)[parked], new[parked]])
    kept_any = keep.any(1)
    if renorm:
      np.testing.assert_allclose(g[kept_any].sum(1), gates[kept_any].sum(1), rtol=1e-5)
    else:
      np.testing.assert_array_equal(g[keep], gates[keep])
  assert (~keep).any() and keep.any()


def test_cost_matrices_follow_the_cluster():
  cluster = cluster_config("edge_hetero_4")
  lat = bud.choice_cost_matrix(TINY, cluster, "latency")
  flop_t = TINY.expert_flops_per_token / cluster.peak_flops
  tau = link_time_per_token(TINY, cluster)
  for n in range(4):
    for m in range(4):
      assert lat[n, m] == pytest.approx(flop_t[m] + (tau[n, m] if n != m else 0.0))
  em = EnergyModel(pj_per_flop=(1.0, 2.0, 3.0, 4.0), nj_per_byte=10.0)
  en = bud.choice_cost_matrix(TINY, cluster, "energy", em)
  f, a = TINY.expert_flops_per_token, TINY.activation_bytes
  assert en[1, 1] == pytest.approx(f * 2e-12)
  assert en[0, 3] == pytest.approx(f * 4e-12 + 2 * a * 10e-9)
  with pytest.raises(BudgetError, match="one per server"):
    bud.choice_cost_matrix(TINY, cluster, "energy", EnergyModel(pj_per_flop=(1.0, 2.0)))
  with pytest.raises(BudgetError, match="nj_per_byte"):
    EnergyModel(nj_per_byte=-1.0)
  with pytest.raises(BudgetError, match="unknown cost kind"):
    bud.choice_cost_matrix(TINY, cluster, "watts")


def test_in_the_model():
  model = MoETransformer(TINY, nnx.Rngs(1))
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (4, 8)), jnp.int32)
  hosts = rng.random((N, L, E)) < 0.3
  hosts[rng.integers(0, N, (L, E)), np.arange(L)[:, None], np.arange(E)[None, :]] = True
  cm = bud.choice_cost_matrix(TINY, cluster_config("edge_hetero_4"), "latency")
  server = np.arange(4, dtype=np.int32)

  @nnx.jit
  def run(m, tok, budget):
    fn = bud.budget_moe_fn(hosts, cm, server, budget, force_top1=False, record=True)
    logits, _ = m(tok, moe_fn=fn)
    r = fn.stacked()
    return logits, r["changed"], r["gates_in"]

  want = nnx.jit(lambda m, t: m(t)[0])(model, tokens)
  logits, dropped, _ = run(model, tokens, jnp.float32(jnp.inf))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))  # no budget: unchanged
  assert not np.asarray(dropped).any()
  masses = []
  for b in (0.0, 1e-6, 1.2e-3, 3e-3):  # nothing, local only, one remote, all
    _, dropped, g_in = run(model, tokens, jnp.float32(b))
    masses.append(float(np.where(np.asarray(dropped), 0, np.asarray(g_in)).sum()))
  assert masses[0] == 0.0 and masses == sorted(masses)
  assert masses[-1] == pytest.approx(float(np.asarray(g_in).sum()))
  with pytest.raises(BudgetError, match="unknown solver"):
    bud.budgeted_selection(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), jnp.zeros(1, jnp.int32),
                           hosts[:, 0], cm, 1.0, solver="dp")
  with pytest.raises(BudgetError, match=r"k=13 must be in \[1, 12\]"):
    bud.subsets(13)


def test_routing_energy_matches_loops():
  from moe_edge.extensions.harness import routing_energy
  rng = np.random.default_rng(5)
  t, n = 30, 3
  ids = np.argsort(rng.random((t, L, E)), axis=-1)[..., :K]
  server = rng.integers(0, n, t)
  route = rng.integers(0, n, (n, L, E))
  cm = rng.random((n, n))
  run = rng.random((t, L, K)) < 0.7
  want = np.zeros(t)
  for i in range(t):
    for l in range(L):
      for r in range(K):
        if run[i, l, r]:
          want[i] += cm[server[i], route[server[i], l, ids[i, l, r]]]
  np.testing.assert_allclose(routing_energy(ids, server, route, cm, run), want)
