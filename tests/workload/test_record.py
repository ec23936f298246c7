"""record_trace: routing recorded from the Flax model equals per-request forward passes."""
import numpy as np
import pytest

pytest.importorskip("moe_edge.model.transformer")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_edge.config import model_config  # noqa: E402
from moe_edge.model.transformer import MoETransformer  # noqa: E402
from moe_edge.workload.record import record_trace  # noqa: E402
from moe_edge.workload.streams import Request, make_streams  # noqa: E402
from moe_edge.workload.traces import TraceError  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
  cfg = model_config("tiny")
  return cfg, MoETransformer(cfg, nnx.Rngs(0))


def test_recorded_routing_equals_single_request_forwards(tiny):
  cfg, model = tiny
  reqs = make_streams(2, 3, 16, alpha=0.8, seed=0)
  short = Request(server=1, request_id=len(reqs), domain="c4",
                  tokens=np.arange(65, 65 + 8, dtype=np.int32), step=1)
  reqs = reqs + [short]
  tr = record_trace(model, cfg, reqs, num_servers=2, batch_size=4, note="t")
  tr.check_matches(cfg.n_moe_layers, cfg.n_experts, cfg.top_k, 2)
  assert tr.num_tokens == 6 * 16 + 8 and tr.model == "tiny" and tr.note == "t"
  assert np.all(np.diff(tr.step) >= 0)
  single = jax.jit(lambda toks: model(toks)[1])
  for r in reqs:
    sel = tr.request == r.request_id
    assert np.all(tr.server[sel] == r.server) and np.all(tr.step[sel] == r.step)
    assert np.array_equal(tr.position[sel], np.arange(len(r.tokens)))
    aux = single(jnp.asarray(r.tokens[None]))
    assert np.array_equal(tr.expert_ids[sel], np.asarray(aux["expert_ids"][0]))
    assert np.allclose(tr.gate_weights[sel], np.asarray(aux["gates"][0]), atol=1e-5)


def test_record_errors(tiny):
  cfg, model = tiny
  ok = Request(server=0, request_id=0, domain="c4", tokens=np.zeros(8, np.int32), step=0)
  cases = [
      ([], 1, "at least one request"),
      ([Request(server=3, request_id=0, domain="c4", tokens=ok.tokens, step=0)], 2, "server 3"),
      ([Request(server=0, request_id=0, domain="c4", tokens=np.full(8, 300, np.int32), step=0)],
       1, "vocab_size"),
      ([Request(server=0, request_id=0, domain="c4", tokens=np.zeros(cfg.max_seq_len + 1,
                                                                    np.int32), step=0)],
       1, "max_seq_len"),
      ([ok, ok], 1, "unique"),
  ]
  for reqs, n, match in cases:
    with pytest.raises(TraceError, match=match):
      record_trace(model, cfg, reqs, num_servers=n, batch_size=2)
  with pytest.raises(TraceError, match="batch_size"):
    record_trace(model, cfg, [ok], num_servers=1, batch_size=0)
