"""Cost model: a hand-computed toy case, a loop-by-loop numpy reference, and properties."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import ClusterConfig, ModelConfig, ServerSpec, cluster_config, model_config
from moe_edge.cost import (Calibration, CalibrationError, CostError, bytes_matrix, decode_batches,
                           evaluate, expected_cost, prefill_batches)
from moe_edge.core.hardware import Hardware
from moe_edge.cost import counting
from moe_edge.placement.problem import Placement, PlacementProblem
from moe_edge.workload.traces import ActivationTrace, TraceError


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def make_trace(ids, server, step, num_experts, num_servers, request=None):
  ids = np.asarray(ids, dtype=np.int32)
  t = ids.shape[0]
  return ActivationTrace(
      expert_ids=ids, gate_weights=np.ones(ids.shape, np.float32),
      server=np.asarray(server, np.int32),
      request=np.arange(t, dtype=np.int32) if request is None else np.asarray(request, np.int32),
      position=np.zeros(t, np.int32), step=np.asarray(step, np.int32), model="test",
      num_experts=num_experts, num_servers=num_servers)


def random_cluster(rng, n):
  servers = tuple(ServerSpec(f"s{i}", memory_bytes=1e9, peak_flops=float(rng.uniform(5e5, 2e6)),
                             mem_bandwidth=float(rng.uniform(1e6, 4e6))) for i in range(n))
  bw = rng.uniform(1e3, 1e4, (n, n))
  lat = rng.uniform(1e-3, 1e-2, (n, n))
  return ClusterConfig("random", servers, tuple(map(tuple, bw)), tuple(map(tuple, lat)))


def scaled_peak(cluster, scale):
  return dataclasses.replace(cluster, servers=tuple(
      dataclasses.replace(s, peak_flops=s.peak_flops * scale) for s in cluster.servers))


def random_placement(rng, model, cluster, replicas=0.3):
  """Every expert on a random owner plus random replicas; remote tokens go to a random replica."""
  n, l, e = cluster.num_servers, model.n_moe_layers, model.n_experts
  hosts = rng.random((n, l, e)) < replicas
  hosts[rng.integers(0, n, (l, e)), np.arange(l)[:, None], np.arange(e)[None, :]] = True
  route = np.empty((n, l, e), np.int32)
  for i in range(n):
    for j in range(l):
      for x in range(e):
        route[i, j, x] = i if hosts[i, j, x] else rng.choice(np.flatnonzero(hosts[:, j, x]))
  return Placement.from_hosts(hosts, model, cluster, route=route)


def random_trace(rng, model, n_servers, n_tokens, n_steps):
  l, e, k = model.n_moe_layers, model.n_experts, model.top_k
  ids = np.argsort(rng.random((n_tokens, l, e)), axis=-1)[..., :k]
  return make_trace(ids, rng.integers(0, n_servers, n_tokens),
                    rng.integers(0, n_steps, n_tokens) * 3 + 7, e, n_servers)


def reference(trace, model, cluster, placement, flops_eff=None, bw_eff=None, act=None):
  """The module docstring's formulas, one token-choice at a time."""
  n_srv, n_lay, n_exp = placement.hosts.shape
  act = model.activation_bytes if act is None else act
  peak = cluster.peak_flops * (1.0 if flops_eff is None else flops_eff)
  mbw = cluster.mem_bandwidth * (1.0 if bw_eff is None else bw_eff)
  bw, lat = cluster.bandwidth_matrix, cluster.latency_matrix
  out = dict(step=[], dense=[], dispatch=[], combine=[], compute=[],
             server_compute=np.zeros((n_srv, n_lay)), load=np.zeros((n_srv, n_lay), np.int64),
             bytes=np.zeros((n_lay, n_srv, n_srv), np.int64), local=np.zeros(n_srv),
             total=np.zeros(n_srv))
  for s in np.unique(trace.step):
    toks = np.flatnonzero(trace.step == s)
    b = np.bincount(trace.server[toks], minlength=n_srv)
    dense = max(max(model.dense_bytes / mbw[n], b[n] * model.dense_flops_per_token / peak[n])
                for n in range(n_srv) if b[n] > 0)
    disp_l, comb_l, comp_l = [], [], []
    for l in range(n_lay):
      c = np.zeros((n_srv, n_srv), np.int64)
      on = np.zeros((n_srv, n_exp), np.int64)
      for t in toks:
        n = trace.server[t]
        for e in trace.expert_ids[t, l]:
          m = placement.route[n, l, e]
          on[m, e] += 1
          out["load"][m, l] += 1
          out["total"][n] += 1
          if m == n:
            out["local"][n] += 1
          else:
            c[n, m] += 1
      d = c * act
      out["bytes"][l] += d
      disp = max([max(lat[n, m] for m in range(n_srv) if d[n, m]) +
                  sum(d[n, m] / bw[n, m] for m in range(n_srv) if d[n, m])
                  for n in range(n_srv) if d[n].any()] or [0.0])
      comb = max([max(lat[m, n] for n in range(n_srv) if d[n, m]) +
                  sum(d[n, m] / bw[m, n] for n in range(n_srv) if d[n, m])
                  for m in range(n_srv) if d[:, m].any()] or [0.0])
      comp = np.zeros(n_srv)
      for m in range(n_srv):
        for e in range(n_exp):
          if on[m, e]:
            comp[m] += max(model.expert_bytes / mbw[m],
                           on[m, e] * model.expert_flops_per_token / peak[m])
      out["server_compute"][:, l] += comp
      disp_l.append(disp)
      comb_l.append(comb)
      comp_l.append(comp.max())
    out["step"].append(dense + sum(disp_l) + sum(comb_l) + sum(comp_l))
    for key, v in (("dense", dense), ("dispatch", disp_l), ("combine", comb_l),
                   ("compute", comp_l)):
      out[key].append(v)
  out = {k: np.asarray(v) for k, v in out.items()}
  out["server_compute"] /= len(out["step"])
  return out


def assert_matches_reference(rep, ref):
  np.testing.assert_allclose(rep.step_latency, ref["step"], rtol=1e-12)
  np.testing.assert_allclose(rep.dense_time, ref["dense"], rtol=1e-12)
  np.testing.assert_allclose(rep.dispatch_time, ref["dispatch"].mean(0), rtol=1e-12)
  np.testing.assert_allclose(rep.combine_time, ref["combine"].mean(0), rtol=1e-12)
  np.testing.assert_allclose(rep.compute_time, ref["compute"].mean(0), rtol=1e-12)
  np.testing.assert_allclose(rep.server_compute, ref["server_compute"], rtol=1e-12)
  np.testing.assert_array_equal(rep.load, ref["load"])
  np.testing.assert_array_equal(rep.dispatch_bytes, ref["bytes"])
  np.testing.assert_array_equal(rep.local_choices, ref["local"])
  np.testing.assert_array_equal(rep.total_choices, ref["total"])


@pytest.fixture(scope="module")
def tiny():
  return model_config("tiny")


# --------------------------------------------------------------------------------------------
# Hand-checked toy case
# --------------------------------------------------------------------------------------------
def test_two_server_toy_by_hand():
  model = ModelConfig(name="toy", vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1,
                      head_dim=4, n_experts=2, top_k=1, d_ff_expert=8, bytes_per_param=1)
  # Sizes from the config formulas: expert 3*d*f = 3*4*8 = 96 params at 1 byte -> 96 bytes,
  # 2*96 = 192 FLOPs per token; activations d*2 = 8 bytes; dense params
  # attention 4*4*(2+2) = 64 + router 4*2 = 8 + norms 2*4 = 8 + embeddings 8*4*2 = 64 + final
  # norm 4 = 148 -> 148 bytes, 2*(148 - 8*4) = 232 FLOPs per token.
  assert (model.expert_bytes, model.expert_flops_per_token, model.activation_bytes,
          model.dense_bytes, model.dense_flops_per_token) == (96, 192, 8, 148, 232)
  servers = (ServerSpec("a", memory_bytes=1000, peak_flops=192, mem_bandwidth=64),
             ServerSpec("b", memory_bytes=300, peak_flops=96, mem_bandwidth=48))
  cluster = ClusterConfig("toy", servers, bandwidth=((0, 8), (4, 0)),
                          latency=((0, 0.5), (0.25, 0)))
  # Server 0 holds expert 0, server 1 expert 1.
  placement = Placement.from_hosts(np.array([[[1, 0]], [[0, 1]]], bool), model, cluster)
  np.testing.assert_array_equal(placement.route[:, 0, :], [[0, 1], [0, 1]])
  # Step 0: server 0 tokens pick e0, e1, e1; server 1 tokens pick e0, e1.
  # Step 1: one token of server 0 picks e0.
  trace = make_trace([[[0]], [[1]], [[1]], [[0]], [[1]], [[0]]], [0, 0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0, 1], num_experts=2, num_servers=2)
  rep = evaluate(trace, model, cluster, placement)

  # Bytes: server 0 sends 2 choices to 1 (2*8 = 16 B), server 1 sends 1 choice to 0 (8 B);
  # the combine returns the same amounts: 2 * (16 + 8) = 48 bytes cross servers.
  np.testing.assert_array_equal(rep.dispatch_bytes, [[[0, 16], [8, 0]]])
  np.testing.assert_array_equal(rep.bytes_matrix, [[0, 16 + 8], [8 + 16, 0]])
  assert rep.cross_bytes == 48
  np.testing.assert_array_equal(bytes_matrix(trace, placement, 8), rep.dispatch_bytes)
  # Coverage: local choices t0 (s0, e0), t4 (s1, e1), t5 (s0, e0) = 3 of 6.
  assert rep.coverage == pytest.approx(3 / 6)
  np.testing.assert_allclose(rep.coverage_per_server, [2 / 4, 1 / 2])
  np.testing.assert_array_equal(rep.load, [[3], [3]])

  # Step 0. Dispatch: server 0: 0.5 + 16/8 = 2.5; server 1: 0.25 + 8/4 = 2.25 -> 2.5.
  # Combine: server 1 returns 16 B to 0: 0.25 + 16/4 = 4.25; server 0 returns 8 B: 0.5 + 8/8
  # = 1.5 -> 4.25. Compute: server 0 runs e0 for 2 tokens: max(96/64, 2*192/192) = 2;
  # server 1 runs e1 for 3 tokens: max(96/48, 3*192/96) = 6 -> 6. Dense: server 0 with 3
  # tokens: max(148/64, 3*232/192) = 3.625; server 1 with 2: max(148/48, 2*232/96) = 4.8333.
  step0 = max(148 / 64, 3 * 232 / 192, 148 / 48, 2 * 232 / 96) + 2.5 + 6 + 4.25
  # Step 1: nothing crosses; server 0 runs e0 for 1 token: max(1.5, 1) = 1.5 (weight-read
  # bound); dense only on server 0: max(148/64, 232/192) = 2.3125; server 1 idle.
  step1 = 148 / 64 + 1.5
  np.testing.assert_allclose(rep.step_latency, [step0, step1], rtol=1e-12)
  np.testing.assert_allclose(rep.dispatch_time, [(2.5 + 0) / 2])
  np.testing.assert_allclose(rep.combine_time, [(4.25 + 0) / 2])
  np.testing.assert_allclose(rep.compute_time, [(6 + 1.5) / 2])
  np.testing.assert_allclose(rep.server_compute, [[(2 + 1.5) / 2], [6 / 2]])
  assert rep.latency == pytest.approx((step0 + step1) / 2)
  # Memory: one expert each + dense weights; b's 300 bytes fit 96 + 148 = 244.
  np.testing.assert_array_equal(rep.memory_used, [96 + 148, 96 + 148])
  assert rep.fits
  row = rep.to_row()
  assert row["latency_ms"] == pytest.approx(1e3 * (step0 + step1) / 2)
  assert row["cross_mb_per_step"] == pytest.approx(48 / 2 / 1e6)

  # float32 execution: 4-byte activations per element, 16 bytes per token-choice.
  rep32 = evaluate(trace, model, cluster, placement, activation_bytes=16)
  assert rep32.cross_bytes == 96
  # Dispatch doubles its transfer part: server 0: 0.5 + 32/8 = 4.5 (server 1: 0.25 + 16/4).
  assert rep32.dispatch_time[0] == pytest.approx(4.5 / 2)

  # Calibration: halve server 1's FLOP rate -> e1 for 3 tokens costs 3*192/48 = 12.
  cal = Calibration(np.array([1.0, 0.5]), np.array([1.0, 1.0]), "test")
  rep_c = evaluate(trace, model, cluster, placement, calibration=cal)
  assert rep_c.compute_time[0] == pytest.approx((12 + 1.5) / 2)
  # ... and the dense part of server 1: max(148/48, 2*232/48) = 9.6667.
  assert rep_c.dense_time[0] == pytest.approx(2 * 232 / 48)


# --------------------------------------------------------------------------------------------
# Against the loop reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens,n_steps,peak_scale", [
    (120, 1, 1.0), (150, 6, 1.0), (40, 40, 1.0), (150, 6, 1e3)])
def test_matches_reference(tiny, n_tokens, n_steps, peak_scale):
  # Few large steps: dense counting; with fast servers (peak_scale) every used expert is
  # weight-read bound and only the sets of used experts are counted.
  rng = np.random.default_rng(n_tokens + n_steps)
  cluster = scaled_peak(random_cluster(rng, 4), peak_scale)
  placement = random_placement(rng, tiny, cluster)
  trace = random_trace(rng, tiny, 4, n_tokens, n_steps)
  fe, be = rng.uniform(0.3, 1.0, 4), rng.uniform(0.3, 1.0, 4)
  rep = evaluate(trace, tiny, cluster, placement,
                 calibration=Calibration(fe, be, "test"), activation_bytes=12)
  assert_matches_reference(rep, reference(trace, tiny, cluster, placement, fe, be, act=12))
  np.testing.assert_array_equal(bytes_matrix(trace, placement, 12), rep.dispatch_bytes)


def test_matches_reference_many_chunks(tiny, monkeypatch):
  monkeypatch.setattr(counting, "_CHUNK_CHOICES", 40)  # about 10 tokens per chunk
  rng = np.random.default_rng(5)
  cluster = random_cluster(rng, 4)
  placement = random_placement(rng, tiny, cluster)
  trace = random_trace(rng, tiny, 4, 200, 25)
  rep = evaluate(trace, tiny, cluster, placement)
  assert_matches_reference(rep, reference(trace, tiny, cluster, placement))


@pytest.mark.parametrize("n_experts,tokens_per_step,peak_scale,path", [
    (8, 1, 1.0, "_chunk_sparse"), (40, 1, 1e3, "_chunk_small"), (128, 3, 1e3, "_chunk_small"),
    (128, 3, 1e-3, "_chunk_sparse")])
def test_matches_reference_small_steps(n_experts, tokens_per_step, peak_scale, path):
  # Many steps of few tokens: the key space (steps * N * L * E) is far larger than the
  # token-choices, so the counting runs on expert bit masks (every used expert weight-read
  # bound: fast servers) or on sorted keys (slow servers). 128 experts take two mask words.
  model = ModelConfig(name="wide", vocab_size=16, d_model=8, n_layers=2, n_heads=1,
                      n_kv_heads=1, head_dim=8, n_experts=n_experts, top_k=2, d_ff_expert=4)
  rng = np.random.default_rng(n_experts)
  cluster = scaled_peak(random_cluster(rng, 4), peak_scale)
  placement = random_placement(rng, model, cluster)
  n_steps = {8: 1500, 40: 400, 128: 200}[n_experts]
  trace = random_trace(rng, model, 4, n_steps * tokens_per_step, 1)
  trace = dataclasses.replace(trace, step=rng.permutation(
      np.repeat(np.arange(n_steps), tokens_per_step)).astype(np.int32))
  hw = Hardware.build(model, cluster)
  chosen = counting.counting_path(n_steps, trace.num_tokens * 2 * 2, tokens_per_step,
                                     counting.RouteMaps.build(placement.route), hw)
  assert chosen.__name__ == path  # the premise of this case
  rep = evaluate(trace, model, cluster, placement)
  assert_matches_reference(rep, reference(trace, model, cluster, placement))


@pytest.mark.parametrize("n_experts,every_server", [(40, True), (40, False), (128, True)])
def test_matches_reference_one_token_per_server_per_step(n_experts, every_server):
  # Decode with one token per server per step: every (step, server) group is a single token
  # (no group sums) and, when every server has a token at every step, the counts are laid out
  # by reshaping instead of scattering.
  model = ModelConfig(name="wide", vocab_size=16, d_model=8, n_layers=2, n_heads=1,
                      n_kv_heads=1, head_dim=8, n_experts=n_experts, top_k=2, d_ff_expert=4)
  rng = np.random.default_rng(n_experts + every_server)
  cluster = scaled_peak(random_cluster(rng, 4), 1e3)
  placement = random_placement(rng, model, cluster)
  n_steps = 400
  step = np.repeat(np.arange(n_steps), 4)
  server = np.tile(np.arange(4), n_steps)
  if not every_server:
    keep = rng.random(step.size) < 0.6
    step, server = step[keep], server[keep]
  ids = np.argsort(rng.random((step.size, 2, n_experts)), axis=-1)[..., :2]
  perm = rng.permutation(step.size)
  trace = make_trace(ids[perm], server[perm], step[perm] * 2 + 1, n_experts, 4)
  hw = Hardware.build(model, cluster)
  chosen = counting.counting_path(n_steps, trace.num_tokens * 2 * 2, 4,
                                     counting.RouteMaps.build(placement.route), hw)
  assert chosen.__name__ == "_chunk_small"  # the premise of this case
  rep = evaluate(trace, model, cluster, placement, activation_bytes=12)
  assert_matches_reference(rep, reference(trace, model, cluster, placement, act=12))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
def test_all_local_placement_moves_nothing(tiny):
  rng = np.random.default_rng(1)
  cluster = random_cluster(rng, 4)
  placement = Placement.from_hosts(np.ones((4, tiny.n_moe_layers, tiny.n_experts), bool), tiny,
                                   cluster)
  rep = evaluate(random_trace(rng, tiny, 4, 100, 5), tiny, cluster, placement)
  assert rep.cross_bytes == 0 and rep.coverage == 1.0
  np.testing.assert_array_equal(rep.coverage_per_server, 1.0)
  np.testing.assert_array_equal(rep.dispatch_time, 0)
  np.testing.assert_array_equal(rep.combine_time, 0)


def test_dispatch_and_combine_bytes_are_symmetric(tiny):
  rng = np.random.default_rng(2)
  cluster = random_cluster(rng, 4)
  placement = random_placement(rng, tiny, cluster, replicas=0.1)
  trace = random_trace(rng, tiny, 4, 200, 4)
  rep = evaluate(trace, tiny, cluster, placement)
  d = rep.dispatch_bytes.sum(0)
  np.testing.assert_array_equal(rep.bytes_matrix, d + d.T)
  np.testing.assert_array_equal(rep.bytes_matrix, rep.bytes_matrix.T)
  assert rep.cross_bytes == rep.bytes_matrix.sum() == 2 * d.sum() > 0
  # Remote choices times the activation size, from first principles.
  srv = trace.server[:, None, None]
  dest = placement.route[srv, np.arange(tiny.n_moe_layers)[None, :, None], trace.expert_ids]
  assert d.sum() == (dest != srv).sum() * tiny.activation_bytes
  assert rep.coverage == pytest.approx((dest == srv).mean())


def test_more_bandwidth_never_increases_latency(tiny):
  rng = np.random.default_rng(3)
  cluster = random_cluster(rng, 4)
  placement = random_placement(rng, tiny, cluster, replicas=0.2)
  trace = random_trace(rng, tiny, 4, 300, 10)
  prev = None
  for scale in (0.5, 1.0, 2.0, 10.0, 1e6):
    bw = tuple(tuple(x * scale for x in row) for row in cluster.bandwidth)
    rep = evaluate(trace, tiny, dataclasses.replace(cluster, bandwidth=bw), placement)
    if prev is not None:
      assert np.all(rep.step_latency <= prev.step_latency + 1e-15)
      assert np.all(rep.dispatch_time + rep.combine_time
                    <= prev.dispatch_time + prev.combine_time + 1e-15)
    prev = rep
  # At (nearly) infinite bandwidth only the latencies of used links remain.
  assert np.all(prev.dispatch_time <= cluster.latency_matrix.max() + 1e-6)


def test_bad_inputs_raise_clear_errors(tiny):
  rng = np.random.default_rng(4)
  cluster = cluster_config("edge_hetero_4")
  placement = random_placement(rng, tiny, cluster)
  trace = random_trace(rng, tiny, 4, 20, 2)
  with pytest.raises(TraceError, match="MoE layers"):
    evaluate(random_trace(rng, model_config("small_moe"), 4, 5, 1), tiny, cluster, placement)
  with pytest.raises(TraceError, match="servers"):
    evaluate(random_trace(rng, tiny, 3, 20, 2).select(np.ones(20, bool)), tiny,
             cluster_config("edge_hetero_8"), placement)
  with pytest.raises(CostError, match=r"placement is \[N, L, E\]"):
    evaluate(trace, tiny, cluster, Placement.from_hosts(
        np.ones((4, 1, 8), bool), tiny, cluster))
  with pytest.raises(CostError, match="phase"):
    evaluate(trace, tiny, cluster, placement, phase="training")
  with pytest.raises(CostError, match="activation_bytes"):
    evaluate(trace, tiny, cluster, placement, activation_bytes=0)
  with pytest.raises(CostError, match="no tokens"):
    evaluate(trace.select(np.zeros(20, bool)), tiny, cluster, placement)
  with pytest.raises(CalibrationError, match="4"):
    evaluate(trace, tiny, cluster, placement,
             calibration=Calibration(np.ones(3), np.ones(3), "test"))
  broken = dataclasses.replace(placement, route=np.zeros_like(placement.route))
  with pytest.raises(CostError, match="invalid placement"):
    evaluate(trace, tiny, cluster, broken)


def test_memory_fit_reported(tiny):
  rng = np.random.default_rng(6)
  small = ServerSpec("small", memory_bytes=tiny.dense_bytes + 3 * tiny.expert_bytes,
                     peak_flops=1e9, mem_bandwidth=1e9)
  big = dataclasses.replace(small, name="big", memory_bytes=1e9)
  cluster = ClusterConfig("fit", (small, big), ((0, 1e6), (1e6, 0)), ((0, 0), (0, 0)))
  hosts = np.zeros((2, tiny.n_moe_layers, tiny.n_experts), bool)
  hosts[1] = True
  hosts[0, 0, :4] = True  # 4 experts on a server with room for 3
  rep = evaluate(random_trace(rng, tiny, 2, 10, 1), tiny, cluster,
                 Placement.from_hosts(hosts, tiny, cluster))
  np.testing.assert_array_equal(rep.memory_used, tiny.dense_bytes + tiny.expert_bytes *
                                np.array([4, 2 * 8]))
  np.testing.assert_array_equal(rep.fits_per_server, [False, True])
  assert not rep.fits and not rep.to_row()["fits"]


# --------------------------------------------------------------------------------------------
# Expected cost
# --------------------------------------------------------------------------------------------
def test_expected_cost_bytes_and_coverage_match_trace(tiny):
  rng = np.random.default_rng(8)
  cluster = random_cluster(rng, 4)
  placement = random_placement(rng, tiny, cluster, replicas=0.2)
  trace = random_trace(rng, tiny, 4, 400, 1)
  problem = PlacementProblem.build(tiny, cluster, trace.frequency(), trace.tokens_per_server(),
                                   capacity=np.full(4, 100))
  exp = expected_cost(problem, placement, problem.tokens)
  rep = evaluate(trace, tiny, cluster, placement)
  # Bytes and coverage are linear in the counts: the expectation on the trace's own
  # frequencies and batch reproduces them exactly.
  np.testing.assert_allclose(exp.dispatch_bytes, rep.dispatch_bytes, rtol=1e-12)
  np.testing.assert_allclose(exp.load, rep.load, rtol=1e-12)
  assert exp.coverage == pytest.approx(rep.coverage, rel=1e-12)
  np.testing.assert_allclose(exp.dense_time, rep.dense_time, rtol=1e-12)


def test_expected_cost_formula(tiny):
  rng = np.random.default_rng(9)
  cluster = random_cluster(rng, 3)
  placement = random_placement(rng, tiny, cluster, replicas=0.2)
  freq = rng.random((3, tiny.n_moe_layers, tiny.n_experts))
  freq *= tiny.top_k / freq.sum(-1, keepdims=True)
  problem = PlacementProblem.build(tiny, cluster, freq, capacity=np.full(3, 100))
  batch = np.array([4.0, 0.5, 0.0])
  exp = expected_cost(problem, placement, batch, phase="prefill")
  # Direct evaluation of the documented expectation, one layer and server at a time.
  act, bw, lat = tiny.activation_bytes, cluster.bandwidth_matrix, cluster.latency_matrix
  total = dense = 0.0
  for n in range(3):
    if batch[n] > 0:
      dense = max(dense, tiny.dense_bytes / cluster.mem_bandwidth[n],
                  batch[n] * tiny.dense_flops_per_token / cluster.peak_flops[n])
  for l in range(tiny.n_moe_layers):
    on = np.zeros((3, tiny.n_experts))
    c = np.zeros((3, 3))
    for n in range(3):
      for e in range(tiny.n_experts):
        m = placement.route[n, l, e]
        on[m, e] += batch[n] * freq[n, l, e]
        if m != n:
          c[n, m] += batch[n] * freq[n, l, e]
    comp = [sum(max(tiny.expert_bytes / cluster.mem_bandwidth[m] * (1 - np.exp(-on[m, e])),
                    on[m, e] * tiny.expert_flops_per_token / cluster.peak_flops[m])
                for e in range(tiny.n_experts)) for m in range(3)]
    disp = max(max(lat[n, m] * (1 - np.exp(-c[n, m])) for m in range(3)) +
               sum(act * c[n, m] / bw[n, m] for m in range(3) if m != n) for n in range(3))
    comb = max(max(lat[m, n] * (1 - np.exp(-c[n, m])) for n in range(3)) +
               sum(act * c[n, m] / bw[m, n] for n in range(3) if n != m) for m in range(3))
    total += disp + max(comp) + comb
  assert exp.phase == "prefill" and exp.expected
  assert exp.latency == pytest.approx(dense + total, rel=1e-12)
  with pytest.raises(CostError, match="batch_tokens"):
    expected_cost(problem, placement, np.ones(2))


# --------------------------------------------------------------------------------------------
# Regrouping a trace into steps
# --------------------------------------------------------------------------------------------
def test_decode_and_prefill_batches():
  # Server 0: request 10 (3 tokens), 11 (1 token), 12 (2 tokens); server 1: request 20
  # (2 tokens). Tokens interleaved in trace order.
  request = [10, 20, 10, 11, 12, 20, 10, 12]
  server = [0, 1, 0, 0, 0, 1, 0, 0]
  trace = make_trace(np.zeros((8, 1, 1)), server, np.zeros(8), 2, 2, request=request)
  # Decode, 2 requests per server at a time: server 0 runs {10, 11} then {12} (starting when
  # 10, the longest, finishes after 3 steps); server 1 runs {20}.
  dec = decode_batches(trace, batch_size=2)
  np.testing.assert_array_equal(dec.step, [0, 0, 1, 0, 3, 1, 2, 4])
  np.testing.assert_array_equal(decode_batches(trace, 1).step, [0, 0, 1, 3, 4, 1, 2, 5])
  # Prefill, one request per server per step: server 0's requests at steps 0, 1, 2.
  np.testing.assert_array_equal(prefill_batches(trace).step, [0, 0, 0, 1, 2, 0, 0, 2])
  np.testing.assert_array_equal(prefill_batches(trace, 2).step, [0, 0, 0, 0, 1, 0, 0, 1])
  with pytest.raises(CostError):
    decode_batches(trace, 0)


def test_expected_cost_is_a_lower_bound_of_sampled_steps(tiny):
  # Tokens drawn independently from the frequencies: E[max] >= max E makes the expected step
  # time a lower bound of the mean sampled step time (module docstring).
  rng = np.random.default_rng(10)
  cluster = random_cluster(rng, 3)
  placement = random_placement(rng, tiny, cluster, replicas=0.2)
  trace = random_trace(rng, tiny, 3, 300, 1)
  problem = PlacementProblem.build(tiny, cluster, trace.frequency(), capacity=np.full(3, 100))
  batch = np.array([3, 2, 4])
  exp = expected_cost(problem, placement, batch)
  pools = [np.flatnonzero(trace.server == n) for n in range(3)]
  pick = np.concatenate([rng.choice(pools[n], size=(200, batch[n])) for n in range(3)], axis=1)
  sampled = trace.select(pick.ravel())
  sampled = dataclasses.replace(sampled, step=np.repeat(np.arange(200), batch.sum()).astype(
      np.int32))
  rep = evaluate(sampled, tiny, cluster, placement)
  assert rep.num_steps == 200
  assert exp.latency <= rep.latency
  assert exp.cross_bytes == pytest.approx(rep.cross_bytes_per_step, rel=0.1)
