"""Request workloads: Poisson arrivals per server, prompts from the server's domains in the real
held-out text, fixed or drawn output lengths, seeded; Requests format round trip; bad input."""
import numpy as np
import pytest

from moe_edge.workload import corpus
from moe_edge.workload.requests import Requests, RequestsError, make_requests


def test_seeded_poisson_workload_from_heldout_text(tmp_path):
  a = make_requests(3, (4, 9), 5, seed=3, rate=[1.0, 2.0, 4.0], duration_s=200.0, alpha=1.0)
  b = make_requests(3, (4, 9), 5, seed=3, rate=[1.0, 2.0, 4.0], duration_s=200.0, alpha=1.0)
  assert np.array_equal(a.arrival_s, b.arrival_s) and all(
      np.array_equal(x, y) for x, y in zip(a.prompts, b.prompts))
  assert np.all(np.diff(a.arrival_s) >= 0) and a.arrival_s.max() < 200.0
  counts = np.bincount(a.server, minlength=3)
  np.testing.assert_allclose(counts / 200.0, [1.0, 2.0, 4.0], rtol=0.3)  # Poisson: ~sqrt noise
  assert set(a.prompt_tokens) <= set(range(4, 10)) and set(a.output_tokens) == {5}
  held = corpus.load_corpus("heldout")
  for n, dom, p in zip(a.server[:20], a.domain[:20], a.prompts[:20]):
    assert dom == corpus.DOMAINS[n]  # alpha 1: every request from the home domain
    assert bytes(p.astype(np.uint8)) in bytes(held[dom].astype(np.uint8))  # real text
  for suffix in (".npz", ".jsonl"):
    back = Requests.load(a.save(tmp_path / f"r{suffix}"))
    assert np.array_equal(back.server, a.server) and back.domain == a.domain
    np.testing.assert_array_equal(back.arrival_s, a.arrival_s)
    assert all(np.array_equal(x, y) for x, y in zip(back.prompts, a.prompts))
    np.testing.assert_array_equal(back.output_tokens, a.output_tokens)


def test_given_arrivals_and_all_at_once():
  r = make_requests(2, 6, (2, 4), seed=0, arrivals=([1, 0, 1], [0.0, 0.5, 2.0]))
  assert r.server.tolist() == [1, 0, 1] and r.arrival_s.tolist() == [0.0, 0.5, 2.0]
  assert set(r.output_tokens) <= {2, 3, 4}
  burst = make_requests(2, 6, 3, seed=0, requests_per_server=4)
  assert burst.arrival_s.tolist() == [0.0] * 8 and np.bincount(burst.server).tolist() == [4, 4]


def test_bad_workloads_are_refused():
  good = make_requests(1, 4, 2, seed=0, requests_per_server=2)
  with pytest.raises(RequestsError, match="request 1 arrives at 1 s, before request 0 .* sort"):
    Requests(good.server, np.array([2.0, 1.0]), good.domain, good.prompts, good.output_tokens)
  with pytest.raises(RequestsError, match="request 1 asks for 0 output tokens"):
    Requests(good.server, good.arrival_s, good.domain, good.prompts, np.array([2, 0]))
  with pytest.raises(RequestsError, match="request 0 has an empty"):
    Requests(good.server, good.arrival_s, good.domain,
             (np.zeros(0, np.int32), good.prompts[1]), good.output_tokens)
  with pytest.raises(RequestsError, match="request 1 is for server 5"):
    make_requests(2, 4, 2, seed=0, arrivals=([0, 5], [0.0, 1.0]))
  with pytest.raises(RequestsError, match="output_tokens must be >= 1"):
    make_requests(1, 4, 0, seed=0, requests_per_server=1)
  with pytest.raises(RequestsError, match="rate is 0.0"):
    make_requests(1, 4, 2, seed=0, rate=0.0, requests_per_server=1)
