"""Request streams: locality, mixes, drift, windows of the real held-out text, errors."""
import numpy as np
import pytest

from moe_edge.workload.corpus import DOMAINS, load_corpus
from moe_edge.workload.streams import (DriftSchedule, StreamError, domain_probabilities,
                                       make_streams)


def _home_share(reqs, homes):
  return np.mean([r.domain == homes[r.server] for r in reqs])


def test_streams_structure_and_windows():
  n, r, s = 3, 6, 24
  reqs = make_streams(n, r, s, alpha=0.6, seed=0)
  assert len(reqs) == n * r
  assert [q.request_id for q in reqs] == list(range(n * r))
  assert [(q.step, q.server) for q in reqs] == sorted((q.step, q.server) for q in reqs)
  held = {d: t.astype(np.uint8).tobytes() for d, t in load_corpus("heldout").items()}
  train = {d: t.astype(np.uint8).tobytes() for d, t in load_corpus("train").items()}
  for srv in range(n):
    assert [q.step for q in reqs if q.server == srv] == list(range(r))
  for q in reqs:
    assert q.tokens.shape == (s,) and q.tokens.dtype == np.int32
    window = q.tokens.astype(np.uint8).tobytes()
    assert window in held[q.domain]
    assert q.domain_id == DOMAINS.index(q.domain)
  assert any(q.tokens.astype(np.uint8).tobytes() in train[q.domain] for q in
             make_streams(1, 4, 24, 1.0, 0, split="train"))


def test_locality_alpha():
  homes = list(DOMAINS)
  perfect = make_streams(5, 40, 8, alpha=1.0, seed=1)
  assert _home_share(perfect, homes) == 1.0
  never = make_streams(5, 200, 8, alpha=0.0, seed=2)
  assert _home_share(never, homes) == 0.0
  per_other = np.bincount([q.domain_id for q in never if q.server == 0], minlength=5)
  assert per_other[0] == 0 and per_other[1:].min() > 30  # the other 4 domains, ~50 each
  m = 5 * 400
  mixed = make_streams(5, 400, 8, alpha=0.7, seed=3)
  share = _home_share(mixed, homes)
  assert abs(share - 0.7) < 5 * np.sqrt(0.7 * 0.3 / m)


def test_domain_probabilities_formula():
  q = domain_probabilities(["book", {"arxiv": 1, "c4": 3}, (0.2,) * 5], alpha=0.6)
  assert np.allclose(q.sum(1), 1.0)
  assert np.allclose(q[0], [0.1, 0.6, 0.1, 0.1, 0.1])  # 0.4 spread over the 4 other domains
  p = np.array([0.25, 0, 0.75, 0, 0])
  assert np.allclose(q[1], 0.6 * p + 0.4 * (1 - p) / 4)
  assert np.allclose(q[2], 0.2)  # a uniform mix is uniform for any alpha


def test_mix_home_and_custom_homes():
  reqs = make_streams(2, 300, 8, alpha=1.0, seed=4,
                      home_domains=[{"arxiv": 0.5, "github": 0.5}, "wikipedia"])
  s0 = [q.domain for q in reqs if q.server == 0]
  assert set(s0) == {"arxiv", "github"}
  assert abs(s0.count("arxiv") / 300 - 0.5) < 5 * np.sqrt(0.25 / 300)
  assert {q.domain for q in reqs if q.server == 1} == {"wikipedia"}


def test_drift_changes_homes_at_the_step():
  drift = DriftSchedule(((5, ("c4", "github")), (8, ("arxiv", {"book": 1.0}))))
  reqs = make_streams(2, 10, 8, alpha=1.0, seed=5, drift=drift)
  want = {0: ("arxiv", "book"), 5: ("c4", "github"), 8: ("arxiv", "book")}
  for q in reqs:
    start = max(s for s in want if s <= q.step)
    assert q.domain == want[start][q.server], (q.step, q.server, q.domain)


def test_drift_parse_and_describe_round_trip():
  d = DriftSchedule.parse("3:book,c4; 6:arxiv=1+c4=3,github")
  assert d.changes[0] == (3, ("book", "c4"))
  assert d.changes[1][0] == 6 and np.allclose(d.changes[1][1][0], [0.25, 0, 0.75, 0, 0])
  again = DriftSchedule.parse(d.describe())
  assert again.changes[0] == d.changes[0]
  assert np.allclose(again.changes[1][1][0], d.changes[1][1][0])
  assert d.homes_at(2, ("x", "y")) == ("x", "y") and d.homes_at(4, ("x", "y")) == ("book", "c4")


def test_steps_spread_and_determinism():
  reqs = make_streams(2, 10, 8, alpha=0.5, seed=9, steps=5)
  assert [q.step for q in reqs if q.server == 1] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  again = make_streams(2, 10, 8, alpha=0.5, seed=9, steps=5)
  other = make_streams(2, 10, 8, alpha=0.5, seed=10, steps=5)
  assert all(np.array_equal(a.tokens, b.tokens) and a.domain == b.domain
             for a, b in zip(reqs, again))
  assert not all(np.array_equal(a.tokens, b.tokens) for a, b in zip(reqs, other))


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(home_domains=["poetry", "c4"]), "unknown home domain"),
    (dict(home_domains=["c4"]), "one home per server"),
    (dict(seq_len=10**8), "longer than"),
    (dict(drift=DriftSchedule(((1, ("c4",)),))), "one home per server"),
    (dict(home_domains=[{"c4": -1}, "c4"]), "non-negative"),
    (dict(steps=0), "steps"),
])
def test_stream_errors(kwargs, match):
  args = dict(num_servers=2, requests_per_server=3, seq_len=8, alpha=0.5, seed=0)
  args.update(kwargs)
  with pytest.raises(StreamError, match=match):
    make_streams(**args)


@pytest.mark.parametrize("spec", ["book,c4", "x:book", "3:arxiv=a+c4=1", ""])
def test_drift_parse_errors(spec):
  with pytest.raises(StreamError):
    DriftSchedule.parse(spec)


def test_drift_steps_must_increase():
  with pytest.raises(StreamError, match="increase"):
    DriftSchedule(((4, ("c4",)), (4, ("book",))))
