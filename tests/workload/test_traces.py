"""ActivationTrace (the contract): validation, I/O round trip, statistics vs plain loops."""
import dataclasses
import json

import numpy as np
import pytest

from moe_edge.workload.traces import ActivationTrace, TraceError, concatenate

T, L, K, E, N = 40, 3, 2, 6, 3


def _arrays(seed=0, t=T):
  rng = np.random.default_rng(seed)
  ids = np.argsort(rng.random((t, L, E)), axis=-1)[..., :K].astype(np.int32)  # distinct
  gates = (rng.random((t, L, K)) / K).astype(np.float32)  # a softmax share: sums <= 1
  return dict(expert_ids=ids, gate_weights=gates,
              server=rng.integers(0, N, t).astype(np.int32),
              request=np.arange(t, dtype=np.int32) // 4, position=np.arange(t, dtype=np.int32) % 4,
              step=np.arange(t, dtype=np.int32) // 8)


def _trace(**over):
  a = _arrays()
  a.update(over)
  return ActivationTrace(**a, model="tiny", num_experts=E, num_servers=N, source="test",
                         note="n")


def test_valid_trace_properties():
  tr = _trace()
  assert (tr.num_tokens, tr.num_layers, tr.top_k) == (T, L, K)


@pytest.mark.parametrize("over,match", [
    (dict(expert_ids=np.zeros((T, L), np.int32)), r"\[T, L, k\]"),
    (dict(gate_weights=np.zeros((T, L, K + 1), np.float32)), "gate_weights shape"),
    (dict(server=np.zeros(T - 1, np.int32)), "server must be"),
    (dict(step=np.zeros(T, np.float32)), "step must be integers"),
    (dict(expert_ids=np.zeros((T, L, K), np.float32)), "integers"),
])
def test_wrong_shapes_and_dtypes(over, match):
  with pytest.raises(TraceError, match=match):
    _trace(**over)


@pytest.mark.parametrize("bad", [E, -1])
def test_expert_id_out_of_range(bad):
  ids = _arrays()["expert_ids"].copy()
  ids[7, 1, 0] = bad
  with pytest.raises(TraceError, match=r"\(token, layer, rank\) = \(7, 1, 0\)"):
    _trace(expert_ids=ids)


def test_duplicate_top_k():
  ids = _arrays()["expert_ids"].copy()
  ids[5, 2, 1] = ids[5, 2, 0]
  with pytest.raises(TraceError, match="token 5 picks the same expert twice at layer 2"):
    _trace(expert_ids=ids)


@pytest.mark.parametrize("value,match", [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"),
                                         (-0.1, "negative gate")])
def test_bad_gates(value, match):
  g = _arrays()["gate_weights"].copy()
  g[3, 0, 1] = value
  with pytest.raises(TraceError, match=match):
    _trace(gate_weights=g)


def test_server_out_of_range_and_bad_metadata():
  with pytest.raises(TraceError, match="server ids"):
    _trace(server=np.full(T, N, np.int32))
  with pytest.raises(TraceError, match="positive"):
    ActivationTrace(**_arrays(), model="tiny", num_experts=0, num_servers=N)


def test_check_matches():
  tr = _trace()
  tr.check_matches(L, E, K, N)
  with pytest.raises(TraceError, match=f"trace has {L} MoE layers but the model has {L + 1}"):
    tr.check_matches(L + 1, E)
  with pytest.raises(TraceError, match="experts"):
    tr.check_matches(L, E + 2)
  with pytest.raises(TraceError, match="top_k"):
    tr.check_matches(L, E, K + 1)
  with pytest.raises(TraceError, match="servers"):
    tr.check_matches(L, E, K, N + 1)


def test_save_load_round_trip_exact(tmp_path):
  tr = _trace()
  path = tr.save(tmp_path / "sub" / "t.npz")
  back = ActivationTrace.load(path)
  for f in dataclasses.fields(ActivationTrace):
    a, b = getattr(tr, f.name), getattr(back, f.name)
    if isinstance(a, np.ndarray):
      assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    else:
      assert a == b, f.name


def _rewrite(path, **changes):
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  for k, v in changes.items():
    if v is None:
      arrays.pop(k)
    else:
      arrays[k] = v
  np.savez(path, **arrays)


def test_load_rejects_top_k_mismatch_and_missing_arrays(tmp_path):
  path = _trace().save(tmp_path / "t.npz")
  meta = json.loads(str(np.load(path)["metadata"]))
  meta["top_k"] = K + 1
  _rewrite(path, metadata=np.array(json.dumps(meta)))
  with pytest.raises(TraceError, match=f"metadata says top_k={K + 1}"):
    ActivationTrace.load(path)
  path2 = _trace().save(tmp_path / "u.npz")
  _rewrite(path2, position=None)
  with pytest.raises(TraceError, match="position"):
    ActivationTrace.load(path2)
  with pytest.raises(TraceError, match="collect_traces"):
    ActivationTrace.load(tmp_path / "missing.npz")


def test_counts_and_frequency_match_a_plain_loop():
  tr = _trace()
  ref = np.zeros((N, L, E), np.int64)
  for t in range(T):
    for l in range(L):
      for k in range(K):
        ref[tr.server[t], l, tr.expert_ids[t, l, k]] += 1
  assert np.array_equal(tr.counts(), ref)
  tokens = np.array([(tr.server == n).sum() for n in range(N)])
  assert np.array_equal(tr.tokens_per_server(), tokens)
  assert np.allclose(tr.frequency(), ref / tokens[:, None, None])
  assert np.allclose(tr.frequency().sum(-1), K)


def test_window_select_and_concatenate():
  tr = _trace()
  w = tr.window(1, 3)
  assert np.array_equal(w.step, tr.step[(tr.step >= 1) & (tr.step < 3)])
  both = concatenate([tr, w])
  assert both.num_tokens == tr.num_tokens + w.num_tokens
  other = ActivationTrace(**_arrays(), model="x", num_experts=E + 1, num_servers=N)
  with pytest.raises(TraceError):
    concatenate([tr, other])
  with pytest.raises(TraceError):
    concatenate([])
