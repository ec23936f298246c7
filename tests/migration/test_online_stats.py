"""OnlineStats: window and EMA against plain numpy; the jitted update against the numpy one."""
import jax.numpy as jnp
import numpy as np
import pytest

from moe_edge.workload.online_stats import (OnlineStats, StatsError, init_state, tv_distance,
                                            update_jax)

N, L, E, K = 3, 2, 6, 2


def _random_steps(rng, num_steps, tokens_lo=0, tokens_hi=12):
  """Per step: expert_ids [T, L, K] (distinct per token and layer) and server [T]."""
  steps = []
  for _ in range(num_steps):
    t = int(rng.integers(tokens_lo, tokens_hi))
    ids = np.argsort(rng.random((t, L, E)), axis=-1)[..., :K].astype(np.int32)
    srv = rng.integers(0, N, size=t).astype(np.int32)
    steps.append((ids, srv))
  return steps


def _counts(ids, srv):
  c = np.zeros((N, L, E))
  for t in range(len(srv)):
    for l in range(L):
      for r in range(K):
        c[srv[t], l, ids[t, l, r]] += 1
  return c, np.bincount(srv, minlength=N).astype(float)


def test_window_and_ema_match_plain_numpy():
  rng = np.random.default_rng(0)
  steps = _random_steps(rng, 9)
  w, d = 4, 0.7
  stats = OnlineStats(N, L, E, window=w, decay=d)
  per_step = [_counts(ids, srv) for ids, srv in steps]
  for c, tok in per_step:
    stats.update(c, tok)
  # Window: the last w steps, summed, divided by their tokens.
  cw = sum(c for c, _ in per_step[-w:])
  tw = sum(t for _, t in per_step[-w:])
  want_w = np.where(tw[:, None, None] > 0, cw / np.maximum(tw, 1)[:, None, None], 0.0)
  np.testing.assert_allclose(stats.frequency("window"), want_w, rtol=1e-12)
  # EMA of frequencies weighted by tokens: sum_s d^(S-1-s) c_s / sum_s d^(S-1-s) t_s.
  s = len(per_step)
  wts = [d ** (s - 1 - i) for i in range(s)]
  num = sum(wi * c for wi, (c, _) in zip(wts, per_step))
  den = sum(wi * t for wi, (_, t) in zip(wts, per_step))
  np.testing.assert_allclose(stats.frequency("ema"), num / den[:, None, None], rtol=1e-12)
  # Rows sum to top_k for servers that saw tokens.
  np.testing.assert_allclose(stats.frequency("window").sum(-1)[tw > 0], K)


def test_server_without_tokens_keeps_its_frequency():
  stats = OnlineStats(N, L, E, window=2, decay=0.5)
  c = np.zeros((N, L, E))
  c[:, :, 0] = 2.0
  stats.update(c, np.full(N, 1.0))
  before = stats.frequency("ema").copy()
  c2 = np.zeros((N, L, E))
  c2[1:, :, 3] = 2.0
  stats.update(c2, np.array([0.0, 1.0, 1.0]))  # server 0 idle this step
  after = stats.frequency("ema")
  np.testing.assert_allclose(after[0], before[0])
  assert not np.allclose(after[1], before[1])


def test_update_jax_equals_numpy_update():
  rng = np.random.default_rng(1)
  steps = _random_steps(rng, 7, tokens_lo=1)
  np_stats = OnlineStats(N, L, E, window=3, decay=0.8)
  state = init_state(N, L, E, window=3, decay=0.8)
  for ids, srv in steps:
    np_stats.update(*_counts(ids, srv))
    state = update_jax(state, jnp.asarray(ids), jnp.asarray(srv))
  back = OnlineStats.from_state(state)
  assert back.pos == np_stats.pos and back.steps == np_stats.steps
  np.testing.assert_allclose(back.ring_counts, np_stats.ring_counts)
  np.testing.assert_allclose(back.ring_tokens, np_stats.ring_tokens)
  for kind in ("ema", "window"):
    np.testing.assert_allclose(back.frequency(kind), np_stats.frequency(kind), rtol=1e-5,
                               atol=1e-6)


def test_update_jax_ignores_padding_tokens():
  rng = np.random.default_rng(2)
  (ids, srv), = _random_steps(rng, 1, tokens_lo=6, tokens_hi=7)
  valid = np.array([True, False, True, True, False, True])
  state = update_jax(init_state(N, L, E, 2, 0.5), jnp.asarray(ids), jnp.asarray(srv),
                     jnp.asarray(valid))
  want_c, want_t = _counts(ids[valid], srv[valid])
  np.testing.assert_allclose(np.asarray(state.ring_counts[0]), want_c)
  np.testing.assert_allclose(np.asarray(state.ring_tokens[0]), want_t)


def test_drift_is_tv_distance_to_planned():
  stats = OnlineStats(1, 1, 4, window=1, decay=0.5)
  stats.update(np.array([[[2.0, 0, 0, 0]]]), np.array([1.0]))
  stats.mark_planned()
  assert stats.drift()[0, 0] == 0.0
  stats.update(np.array([[[1.0, 1.0, 0, 0]]]), np.array([1.0]))
  p, q = np.array([0.5, 0.5, 0, 0]), np.array([1.0, 0, 0, 0])
  assert stats.drift("window")[0, 0] == pytest.approx(0.5 * np.abs(p - q).sum())
  np.testing.assert_allclose(tv_distance(np.ones((2, 3, 4)), np.ones((2, 3, 4))), 0.0)


def test_bad_input_raises_clear_errors():
  with pytest.raises(StatsError, match="decay"):
    OnlineStats(N, L, E, window=2, decay=1.0)
  stats = OnlineStats(N, L, E, window=2)
  with pytest.raises(StatsError, match=r"\[N, L, E\]"):
    stats.update(np.zeros((N, L, E + 1)), np.ones(N))
  with pytest.raises(StatsError, match="kind"):
    stats.frequency("mean")
  with pytest.raises(StatsError, match="mark_planned"):
    stats.drift()


def test_window_halves_split_the_window_steps():
  rng = np.random.default_rng(3)
  steps = _random_steps(rng, 7, tokens_lo=1)
  stats = OnlineStats(N, L, E, window=4, decay=0.5)
  per_step = [_counts(ids, srv) for ids, srv in steps]
  for c, t in per_step:
    stats.update(c, t)
  # Ring slots after 7 steps with W = 4: slot s holds step 4 + s for s < 3, slot 3 holds step 3.
  slot_step = {0: 4, 1: 5, 2: 6, 3: 3}
  for half, slots in zip(stats.window_halves(), ((0, 2), (1, 3))):
    c = sum(per_step[slot_step[s]][0] for s in slots)
    t = sum(per_step[slot_step[s]][1] for s in slots)
    np.testing.assert_allclose(half, np.where(t[:, None, None] > 0,
                                              c / np.maximum(t, 1)[:, None, None], 0.0))
  with pytest.raises(StatsError, match="two steps"):
    OnlineStats(N, L, E, window=1).window_halves()
