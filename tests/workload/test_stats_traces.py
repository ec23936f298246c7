"""Statistics-driven traces from the real OLMoE / Mixtral routing counts."""
import numpy as np
import pytest

from moe_edge.config import model_config
from moe_edge.workload.corpus import DOMAINS
from moe_edge.workload.sampling import plackett_luce_inclusion
from moe_edge.workload.stats import summarize
from moe_edge.workload.stats_traces import (STATS_MODELS, StatsError, domain_tv, format_domain_tv,
                                            layer_distributions, layer_plan, load_routing_stats,
                                            sample_stats_trace)
from moe_edge.workload.streams import DriftSchedule, StreamError


@pytest.mark.parametrize("name", STATS_MODELS)
def test_load_matches_the_file(name, shared_data):
  st = load_routing_stats(name)
  with np.load(shared_data / "routing_stats" / f"{name}_domain_counts.npz") as z:
    assert np.array_equal(st.counts, z["counts"]) and np.array_equal(st.cross, z["cross"])
    assert st.layers == tuple(z["layers"].tolist()) and st.top_k == int(z["top_k"])
  cfg = model_config(name)
  assert (st.num_layers, st.num_experts, st.top_k) == (cfg.n_moe_layers, cfg.n_experts,
                                                       cfg.top_k)
  assert np.allclose(st.distributions().sum(-1), 1) and np.allclose(st.inclusion().sum(-1),
                                                                    st.top_k)
  assert load_routing_stats(name) is st  # cached


def _tampered(tmp_path, shared_data, **changes):
  with np.load(shared_data / "routing_stats" / "olmoe_1b_7b_domain_counts.npz") as z:
    arrays = {k: z[k].copy() for k in z.files}
  for k, fn in changes.items():
    if fn is None:
      arrays.pop(k)
    else:
      arrays[k] = fn(arrays[k])
  path = tmp_path / "olmoe_1b_7b_domain_counts.npz"
  np.savez(path, **arrays)
  return path


def _bump(a):
  a[0, 0, 0] += 1
  return a


@pytest.mark.parametrize("changes,match", [
    (dict(counts=None), r"lacks the arrays \[.counts.\]"),
    (dict(cross=None), "come together"),
    (dict(counts=_bump), "sum to top_k"),
    (dict(cross=lambda a: np.roll(a, 1, axis=-1)), "marginals"),
    (dict(domains=lambda a: np.array([a[0]] * len(a))), "distinct"),
    (dict(num_layers=lambda a: np.array(20)), "configs/models/olmoe_1b_7b.py"),
    (dict(counts=lambda a: a[:, :, :32]), "shape"),
    (dict(layers=lambda a: np.array([0, 7, 16])), "recorded layers"),
])
def test_load_validation(tmp_path, shared_data, changes, match):
  path = _tampered(tmp_path, shared_data, **changes)
  with pytest.raises(StatsError, match=match):
    load_routing_stats("olmoe_1b_7b", path=path)


def test_unknown_model_lists_the_available_ones():
  with pytest.raises(StatsError, match="mixtral_8x7b"):
    load_routing_stats("gpt_moe")


@pytest.mark.parametrize("name", STATS_MODELS)
def test_layer_plan_is_nearest_recorded_layer(name):
  st = load_routing_stats(name)
  source, perm = layer_plan(st, seed=3)
  for l in range(st.num_layers):
    dists = [abs(l - r) for r in st.layers]
    assert source[l] == dists.index(min(dists))  # the first (earlier) one on ties
    assert sorted(perm[l].tolist()) == list(range(st.num_experts))
    if l in st.layers:
      assert np.array_equal(perm[l], np.arange(st.num_experts))
  unrec = [l for l in range(st.num_layers) if l not in st.layers]
  assert len({tuple(perm[l]) for l in unrec}) == len(unrec)  # a different relabelling per layer
  other = layer_plan(st, seed=4)[1]
  assert not np.array_equal(perm, other) and np.array_equal(perm, layer_plan(st, seed=3)[1])


@pytest.mark.parametrize("name", STATS_MODELS)
def test_layer_distributions_preserve_skew_and_domain_distance(name):
  st = load_routing_stats(name)
  dist = layer_distributions(st, seed=1)
  source, perm = layer_plan(st, seed=1)
  real = st.distributions()
  assert dist.shape == (5, st.num_layers, st.num_experts)
  tv_real = domain_tv(st.counts)
  tv_all = domain_tv(dist)  # domain_tv accepts any non-negative [D, L, E] weights
  ent = lambda p: -np.sum(p * np.log(p), -1)  # noqa: E731
  for l in range(st.num_layers):
    r = source[l]
    if l in st.layers:
      assert np.array_equal(dist[:, l], real[:, st.layers.index(l)])
    assert np.array_equal(dist[:, l, perm[l]], real[:, r])  # same relabelling for every domain
    assert np.array_equal(np.sort(dist[:, l], -1), np.sort(real[:, r], -1))
    assert np.allclose(ent(dist[:, l]), ent(real[:, r]), rtol=0, atol=1e-12)
    assert np.allclose(tv_all[l], tv_real[r], rtol=0, atol=1e-12)


def test_domain_tv_matches_a_loop_and_shows_the_model_difference():
  for name in STATS_MODELS:
    st = load_routing_stats(name)
    tv = domain_tv(st.counts)
    assert tv.shape == (len(st.layers), 5, 5)
    for r in range(len(st.layers)):
      for a in range(5):
        for b in range(5):
          pa = st.counts[a, r] / st.counts[a, r].sum()
          pb = st.counts[b, r] / st.counts[b, r].sum()
          assert np.isclose(tv[r, a, b], 0.5 * np.abs(pa - pb).sum())
    assert "TV" in format_domain_tv(st)
  iu = np.triu_indices(5, 1)
  olmoe = domain_tv(load_routing_stats("olmoe_1b_7b").counts)
  mixtral = domain_tv(load_routing_stats("mixtral_8x7b").counts)
  # The data README's point: OLMoE routes the domains apart, Mixtral almost alike.
  assert olmoe[1][iu].min() > 2 * mixtral[1][iu].max()


@pytest.mark.parametrize("name,tokens", [("olmoe_1b_7b", 6000), ("mixtral_8x7b", 6000)])
def test_sampled_frequencies_converge_to_the_real_counts(name, tokens):
  st = load_routing_stats(name)
  tr = sample_stats_trace(name, 5, tokens, alpha=1.0, seed=0)  # server d serves only domain d
  cfg = model_config(name)
  tr.check_matches(cfg.n_moe_layers, cfg.n_experts, cfg.top_k, 5)
  assert tr.model == name
  target = layer_distributions(st) * st.top_k  # [D, L, E] inclusion frequencies
  sigma = np.sqrt(target * (1 - target) / tokens)
  assert np.all(np.abs(tr.frequency() - target) < 5 * sigma + 1e-3)
  if name == "olmoe_1b_7b":  # the test has power: plain Gumbel-top-k on the shares would fail
    naive = plackett_luce_inclusion(np.log(target.reshape(-1, st.num_experts)), st.top_k)
    assert np.any(np.abs(naive.reshape(target.shape) - target) > 10 * sigma + 1e-3)


def test_trace_layout_ranks_and_gates():
  tr = sample_stats_trace("olmoe_1b_7b", 3, 300, alpha=0.5, seed=1, request_len=128)
  assert tr.num_tokens == 900
  assert np.all(np.diff(tr.step) >= 0)
  lengths = np.bincount(tr.request)
  assert sorted(lengths.tolist()) == [44] * 3 + [128] * 6  # 300 = 128 + 128 + 44
  for rid in np.unique(tr.request):
    sel = tr.request == rid
    assert np.array_equal(tr.position[sel], np.arange(sel.sum()))
    assert len(np.unique(tr.server[sel])) == 1 and len(np.unique(tr.step[sel])) == 1
  srt = np.sort(tr.expert_ids, -1)
  assert np.all(srt[..., 1:] != srt[..., :-1])  # distinct
  g = tr.gate_weights
  assert np.all(g > 0) and np.allclose(g.sum(-1), 1, atol=1e-5)
  assert np.all(np.diff(g, axis=-1) <= 1e-7)  # decreasing with rank


def test_alpha_controls_how_different_the_servers_are():
  st = load_routing_stats("olmoe_1b_7b")
  local = summarize(sample_stats_trace("olmoe_1b_7b", 5, 4000, alpha=1.0, seed=2))
  mixed = summarize(sample_stats_trace("olmoe_1b_7b", 5, 4000, alpha=0.2, seed=2))
  real = domain_tv(st.counts)
  iu = np.triu_indices(5, 1)
  for r, layer in enumerate(st.layers):
    assert abs(local["tv_mean"][layer] - real[r][iu].mean()) < 0.03
    assert local["tv"][layer][iu].min() > 0.1  # every pair of servers differs
    assert mixed["tv_mean"][layer] < 0.3 * local["tv_mean"][layer]  # alpha = 1/D: no locality


def test_drift_moves_a_servers_distribution():
  drift = DriftSchedule(((4, ("github", "book")),))
  tr = sample_stats_trace("olmoe_1b_7b", 2, 8 * 256, alpha=1.0, seed=3, drift=drift,
                          request_len=256)
  real = load_routing_stats("olmoe_1b_7b").distributions()[:, 1]  # layer 7 [D, E]
  before, after = tr.window(0, 4).frequency()[:, 7] / 8, tr.window(4, 8).frequency()[:, 7] / 8
  nearest = lambda p: int(np.argmin(0.5 * np.abs(real - p).sum(-1)))  # noqa: E731
  assert [nearest(before[0]), nearest(before[1])] == [DOMAINS.index("arxiv"),
                                                      DOMAINS.index("book")]
  assert [nearest(after[0]), nearest(after[1])] == [DOMAINS.index("github"),
                                                    DOMAINS.index("book")]


def test_determinism_and_errors():
  a = sample_stats_trace("mixtral_8x7b", 2, 200, 0.8, seed=5)
  b = sample_stats_trace("mixtral_8x7b", 2, 200, 0.8, seed=5)
  c = sample_stats_trace("mixtral_8x7b", 2, 200, 0.8, seed=6)
  assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.gate_weights,
                                                                       b.gate_weights)
  assert not np.array_equal(a.expert_ids, c.expert_ids)
  with pytest.raises(StreamError, match="alpha"):
    sample_stats_trace("mixtral_8x7b", 2, 200, 1.2, seed=0)
  with pytest.raises(StatsError, match="positive"):
    sample_stats_trace("mixtral_8x7b", 0, 200, 0.5, seed=0)
  with pytest.raises(StreamError, match="unknown home domain"):
    sample_stats_trace("mixtral_8x7b", 1, 200, 0.5, seed=0, home_domains=["news"])
