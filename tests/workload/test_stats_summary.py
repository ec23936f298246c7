"""summarize / format_summary against plain per-server, per-layer loops."""
import math

import numpy as np
import pytest

from moe_edge.workload.stats import format_summary, summarize
from moe_edge.workload.traces import ActivationTrace, TraceError


def _trace(n=4, t=300, l=3, e=8, k=2, empty_server=None, seed=0):
  rng = np.random.default_rng(seed)
  skew = rng.dirichlet(np.full(e, 0.5), size=(n, l))  # per-server routing preference
  server = rng.integers(0, n, t)
  if empty_server is not None:
    server[server == empty_server] = (empty_server + 1) % n
  keys = np.log(skew[server]) + rng.gumbel(size=(t, l, e))
  ids = np.argsort(-keys, -1)[..., :k].astype(np.int32)
  return ActivationTrace(expert_ids=ids, gate_weights=np.full((t, l, k), 1 / k, np.float32),
                         server=server.astype(np.int32), request=np.arange(t, dtype=np.int32),
                         position=np.zeros(t, np.int32), step=np.arange(t, dtype=np.int32),
                         model="tiny", num_experts=e, num_servers=n)


def _loop_reference(tr, m):
  n, l, e = tr.num_servers, tr.num_layers, tr.num_experts
  cov, ent = np.full((n, l), np.nan), np.full((n, l), np.nan)
  dist = {}
  for s in range(n):
    for j in range(l):
      c = [0] * e
      for t in range(tr.num_tokens):
        if tr.server[t] == s:
          for x in tr.expert_ids[t, j]:
            c[x] += 1
      total = sum(c)
      if total:
        cov[s, j] = sum(sorted(c, reverse=True)[:m]) / total
        ent[s, j] = -sum(x / total * math.log2(x / total) for x in c if x)
        dist[s, j] = [x / total for x in c]
  tv = np.zeros((l, n, n))
  for j in range(l):
    for a in range(n):
      for b in range(n):
        if (a, j) in dist and (b, j) in dist:
          tv[j, a, b] = 0.5 * sum(abs(x - y) for x, y in zip(dist[a, j], dist[b, j]))
  return cov, ent, tv, dist


def test_summary_matches_loops():
  tr = _trace()
  s = summarize(tr, hot_fraction=0.25)
  m = 2
  cov, ent, tv, _ = _loop_reference(tr, m)
  assert s["hot_m"] == m and s["max_entropy_bits"] == 3.0
  assert np.allclose(s["coverage"], cov) and np.allclose(s["entropy_bits"], ent)
  assert np.allclose(s["tv"], tv)
  iu = np.triu_indices(4, 1)
  assert np.allclose(s["tv_mean"], [tv[j][iu].mean() for j in range(3)])
  assert np.allclose(s["tv_max"], [tv[j][iu].max() for j in range(3)])
  assert np.array_equal(s["tokens"], np.bincount(tr.server, minlength=4))
  # cluster-hot coverage: the m experts hottest over all servers, measured on each server
  counts = tr.counts()
  for j in range(3):
    hot = np.argsort(-counts.sum(0)[j], kind="stable")[:m]
    assert np.allclose(s["coverage_cluster"][:, j], counts[:, j, hot].sum(-1) /
                       counts[:, j].sum(-1))
  assert np.all(s["coverage_cluster"] <= s["coverage"] + 1e-12)  # own hot set is the best m


def test_server_without_tokens_is_nan_and_left_out_of_distances():
  tr = _trace(empty_server=2)
  s = summarize(tr)
  assert s["tokens"][2] == 0 and np.all(np.isnan(s["coverage"][2]))
  _, _, tv, _ = _loop_reference(tr, s["hot_m"])
  live = [0, 1, 3]
  pairs = [(a, b) for i, a in enumerate(live) for b in live[i + 1:]]
  assert np.allclose(s["tv_mean"], [np.mean([tv[j, a, b] for a, b in pairs]) for j in range(3)])
  text = format_summary(s)
  assert "(no tokens)" in text


def test_format_summary_lists_every_server_and_layer():
  text = format_summary(summarize(_trace()), title="T")
  lines = text.splitlines()
  assert lines[0] == "T"
  assert sum(1 for x in lines if x.strip().startswith(("0 ", "1 ", "2 ", "3 "))) == 4 + 3
  wide = format_summary(summarize(_trace(n=10, t=600)))
  assert "min" in wide and "mean" in wide  # many servers: coverage as min / mean / max


def test_hot_fraction_validation():
  with pytest.raises(TraceError, match="hot_fraction"):
    summarize(_trace(), hot_fraction=0.0)
