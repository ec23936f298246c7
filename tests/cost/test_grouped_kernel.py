"""ServerSpec.grouped_kernel=False: a server's expert FFN costs dense over its held slots (XLA's
ragged_dot, results/bench_ffn), in evaluate, expected, the latency search's LayerState and
DanceMoE's refinement alike;
the default (grouped, cost per used expert) is unchanged by held slots."""
import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moe_edge.config import (ClusterConfig, ConfigError, ModelConfig, ServerSpec, cluster_config,
                             model_config, uniform_links)
from moe_edge.core.errors import PlacementError
from moe_edge.core.hardware import Hardware
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost import CostModel
from moe_edge.cost.ffn_calibration import H200_SXM
from moe_edge.experiments.calibration import edge_calibration
from moe_edge.placement.layer_state import LayerState
from moe_edge.placement.refine import LayerCost, refine
from moe_edge.placement.search import candidates
from moe_edge.workload.traces import ActivationTrace

N, L, E, K = 4, 2, 8, 2
MODEL = ModelConfig(name="test_grouped", vocab_size=64, d_model=16, n_layers=L, n_heads=2,
                    n_kv_heads=2, head_dim=8, n_experts=E, top_k=K, d_ff_expert=32,
                    source="test")


def make_cluster(grouped) -> ClusterConfig:
  """``N`` servers whose read/FLOP balance puts ~20 rows at the knee (both regimes occur)."""
  rng = np.random.default_rng(7)
  servers = tuple(ServerSpec(f"s{i}", memory_bytes=1e9, peak_flops=float(rng.uniform(1e7, 4e7)),
                             mem_bandwidth=float(rng.uniform(5e5, 2e6)), grouped_kernel=g)
                  for i, g in enumerate(grouped))
  bw, lat = uniform_links(N, 1e5, 1e-3)
  return ClusterConfig("test_grouped", servers, bw, lat)


GROUPED = make_cluster([True] * N)
DENSE = make_cluster([False] * N)
MIXED = make_cluster([True, False, True, False])


def make_trace(rng, tokens_per_step, n_steps, sources=(0, 1, 2)) -> ActivationTrace:
  """``n_steps`` steps of ``tokens_per_step`` tokens from ``sources`` (server 3 sends none)."""
  t = tokens_per_step * n_steps
  ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)])
                  for _ in range(t)]).astype(np.int32)
  return ActivationTrace(
      expert_ids=ids, gate_weights=np.ones(ids.shape, np.float32),
      server=rng.choice(np.array(sources), t).astype(np.int32),
      request=np.arange(t, dtype=np.int32), position=np.zeros(t, np.int32),
      step=np.repeat(np.arange(n_steps), tokens_per_step).astype(np.int32), model="test",
      num_experts=E, num_servers=N)


def placements(cluster):
  """``(a, b)``: the same routing of servers 0-2's tokens; ``b`` holds more slots on server 3
  (which sends no tokens, so only its own, unused, route rows change)."""
  hosts = np.zeros((N, L, E), bool)
  hosts[np.arange(E) % N, :, np.arange(E)] = True          # expert e on server e % N
  hosts[0, :, 1] = True                                     # a replica
  a = Placement.from_hosts(hosts, MODEL, cluster)
  more = hosts.copy()
  more[3, :, :4] = True                                     # 4 extra slots per layer on 3
  route = a.route.copy()
  route[3][more[3]] = 3                                     # local choices stay local
  b = Placement.from_hosts(more, MODEL, cluster, route=route)
  assert np.array_equal(a.route[:3], b.route[:3])
  return a, b


def reference_dense(hw: Hardware, trace: ActivationTrace, placement: Placement) -> np.ndarray:
  """``[N, L]`` mean over steps of ``max(G read, R G flop)`` (0 without rows), per token-choice
  loops, independently of the counting paths."""
  steps = np.unique(trace.step)
  rows = np.zeros((steps.size, N, L))
  for t in range(trace.num_tokens):
    s = np.searchsorted(steps, trace.step[t])
    for l in range(L):
      for e in trace.expert_ids[t, l]:
        rows[s, placement.route[trace.server[t], l, e], l] += 1
  g = placement.hosts.sum(axis=2)[None]
  t = np.maximum(g * hw.expert_read[None, :, None],
                 rows * g * hw.expert_flop[None, :, None])
  return np.where(rows > 0, t, 0.0).mean(axis=0)


@pytest.mark.parametrize("tokens_per_step,n_steps", [(64, 2), (3, 40), (40, 30)])
def test_evaluate_dense_servers_cost_over_held_slots(tokens_per_step, n_steps):
  """Few large steps, many small read-bound ones, many FLOP-bound ones (the three counting
  paths): dense servers equal the per-choice reference, grouped servers equal the all-grouped
  cluster, and only dense servers get slower with more held slots at the same routing."""
  trace = make_trace(np.random.default_rng(tokens_per_step), tokens_per_step, n_steps)
  reports = {}
  for name, cl in (("grouped", GROUPED), ("dense", DENSE), ("mixed", MIXED)):
    cost = CostModel.build(MODEL, cl)
    a, b = placements(cl)
    reports[name] = [cost.evaluate(trace, p) for p in (a, b)]
    if name != "grouped":
      for p, rep in zip((a, b), reports[name]):
        want = reference_dense(cost.hardware, trace, p)
        dense = ~np.array([s.grouped_kernel for s in cl.servers])
        np.testing.assert_allclose(rep.server_compute[dense], want[dense], rtol=1e-12)
  ga, gb = reports["grouped"]
  np.testing.assert_array_equal(ga.step_latency, gb.step_latency)    # slots do not matter
  da, db = reports["dense"]
  assert np.all(db.server_compute[3] > da.server_compute[3])          # server 3 holds more
  np.testing.assert_array_equal(db.server_compute[:3], da.server_compute[:3])
  assert db.latency > da.latency
  for rep, g in zip(reports["mixed"], reports["grouped"]):             # grouped rows as is
    np.testing.assert_allclose(rep.server_compute[[0, 2]], g.server_compute[[0, 2]], rtol=1e-14)


def test_expected_dense_servers_and_agreement_with_evaluate():
  """On one step whose problem frequencies are the step's own counts, a dense server's
  expected compute is the trace's where it has more than 25 rows (the read's probability
  ``1 - exp(-rows)`` is 1 there to 1e-10); expected grows with held slots only on dense
  servers."""
  rng = np.random.default_rng(3)
  trace = make_trace(rng, 60, 1)
  counts = trace.counts().astype(np.float64)                          # [N, L, E]
  tokens = trace.tokens_per_server().astype(np.float64)
  freq = counts / np.maximum(tokens, 1)[:, None, None]
  for cl in (GROUPED, DENSE):
    cost = CostModel.build(MODEL, cl)
    prob = PlacementProblem.build(MODEL, cl, freq, capacity=np.full(N, L * E))
    a, b = placements(cl)
    ea, eb = (cost.expected(prob, p, tokens) for p in (a, b))
    if cl is GROUPED:
      np.testing.assert_array_equal(ea.server_compute, eb.server_compute)
      continue
    assert np.all(eb.server_compute[3] > ea.server_compute[3])
    for p, ex in ((a, ea), (b, eb)):
      tr = cost.evaluate(trace, p)
      rows = ex.load                                                   # E[R] [N, L]
      np.testing.assert_allclose(rows, tr.load, rtol=1e-12)
      on = rows > 25
      assert on.sum() >= 2
      np.testing.assert_allclose(ex.server_compute[on], tr.server_compute[on], rtol=1e-9)
      g = p.hosts.sum(axis=2)
      hw = cost.hardware
      want = np.maximum(g * hw.expert_read[:, None] * -np.expm1(-rows),
                        rows * g * hw.expert_flop[:, None])
      np.testing.assert_allclose(ex.server_compute, want, rtol=1e-12)


def _search_state(cluster):
  rng = np.random.default_rng(11)
  freq = rng.dirichlet(np.ones(E), size=(N, L)) * K
  prob = PlacementProblem.build(MODEL, cluster, freq, capacity=np.full(N, 7))
  a, _ = placements(cluster)
  batches = np.array([[4.0, 2.0, 6.0, 1.0], [64.0, 32.0, 48.0, 16.0]])
  return prob, a, batches, LayerState.build(prob.hardware, prob.freq, batches, a.hosts, a.route)


@pytest.mark.parametrize("cluster", [DENSE, MIXED], ids=["dense", "mixed"])
def test_layer_state_prices_dense_servers_as_the_cost_model(cluster):
  """LayerState equals CostModel.expected, its candidate prices equal the committed changes
  (which change held slots), and the incremental caches equal a fresh build."""
  prob, a, batches, st = _search_state(cluster)
  cost = CostModel.build(MODEL, cluster)
  for i, phase in enumerate(("decode", "prefill")):
    rep = cost.expected(prob, a, batches[i], phase)
    assert np.isclose(st.step_times()[i], rep.latency, rtol=1e-12)
  room = prob.capacity - st.hosts.sum(axis=(1, 2))
  c = candidates(st, room, st.x.sum(axis=0), np.random.default_rng(0), 4)
  pred = st.evaluate(c.lk, c.ek, c.hk, c.e2, c.h2)
  held_change = 0
  for i in range(c.lk.size):
    trial = LayerState.build(prob.hardware, prob.freq, batches, st.hosts, st.route)
    cols = [(c.ek[i], c.hk[i])] + ([(c.e2[i], c.h2[i])] if c.e2[i] >= 0 else [])
    trial.apply(int(c.lk[i]), [e for e, _ in cols], [h for _, h in cols])
    np.testing.assert_allclose(trial.time[:, c.lk[i]], pred[:, i], rtol=1e-10)
    fresh = LayerState.build(prob.hardware, prob.freq, batches, trial.hosts, trial.route)
    np.testing.assert_allclose(trial.time, fresh.time, rtol=1e-10)
    held_change += not np.array_equal(trial.hosts.sum(axis=2), st.hosts.sum(axis=2))
  assert held_change > 0
  # the screen's compute term is exact: with links free of latency and bytes it equals evaluate
  free = dataclasses.replace(cluster, bandwidth=uniform_links(N, 1e30, 0.0)[0],
                             latency=uniform_links(N, 1.0, 0.0)[1])
  _, _, _, st0 = _search_state(free)
  c0 = candidates(st0, room, st0.x.sum(axis=0), np.random.default_rng(0), 4)
  np.testing.assert_allclose(st0.screen(c0.lk, c0.ek, c0.hk, c0.e2, c0.h2),
                             st0.evaluate(c0.lk, c0.ek, c0.hk, c0.e2, c0.h2), rtol=1e-9)


def test_default_is_grouped_and_hardware_formula():
  assert ServerSpec("x", 1e9, 1e12, 1e11).grouped_kernel is True
  hw = Hardware.build(MODEL, MIXED)
  np.testing.assert_array_equal(hw.grouped, [True, False, True, False])
  per = np.full((2, N), 0.123)
  rows, held = np.array([[0.0, 0.0, 5.0, 5.0], [30.0, 30.0, 30.0, 30.0]]), np.full(N, 3)
  got = hw.compute_time(per, rows, held)
  want = np.where(rows > 0, np.maximum(3 * hw.expert_read, rows * 3 * hw.expert_flop), 0.0)
  np.testing.assert_array_equal(got[:, [0, 2]], per[:, [0, 2]])
  np.testing.assert_allclose(got[:, [1, 3]], want[:, [1, 3]], rtol=1e-15)
  assert Hardware.build(MODEL, GROUPED).compute_time(per, rows, held) is per


def test_cluster_config_file_with_the_field_loads(tmp_path, monkeypatch):
  (tmp_path / "clusters").mkdir()
  (tmp_path / "clusters" / "no_grouped.py").write_text(textwrap.dedent("""\
      from moe_edge.config import ClusterConfig, ServerSpec, uniform_links
      def get_config():
        servers = (ServerSpec("a", 1e9, 1e12, 1e11, grouped_kernel=False),
                   ServerSpec("b", 1e9, 1e12, 1e11))
        bw, lat = uniform_links(2, 1e8, 1e-4)
        return ClusterConfig("no_grouped", servers, bw, lat)
      """))
  monkeypatch.setenv("MOE_EDGE_CONFIGS", str(tmp_path))
  got = cluster_config("no_grouped")
  assert [s.grouped_kernel for s in got.servers] == [False, True]
  monkeypatch.delenv("MOE_EDGE_CONFIGS")
  preset = cluster_config("edge_hetero_4", grouped_kernel=False)
  assert not any(s.grouped_kernel for s in preset.servers)
  assert preset.name.endswith("+dense_ffn")
  assert cluster_config("edge_hetero_4") == cluster_config("edge_hetero_4", grouped_kernel=True)


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_bad_grouped_kernel_is_a_one_line_config_error(bad):
  with pytest.raises(ConfigError, match=r"grouped_kernel must be True .* or False") as e:
    ServerSpec("x", 1e9, 1e12, 1e11, grouped_kernel=bad)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="grouped_kernel"):
    cluster_config("homogeneous_4", grouped_kernel="false")


def test_dense_over_slots_cost_follows_the_measured_lax_rows():
  """Against the committed H200 benchmark (results/bench_ffn/h200.json), the dense-over-slots
  cost with the h200_grouped calibration follows XLA's ragged_dot rows within the window its
  measured/predicted ratios span (0.50-1.07 when committed: it over-predicts prefill about 2x,
  its shape in G and rows holds), while the per-used-expert cost misses the large-G rows."""
  bench = json.loads((Path(__file__).resolve().parents[2] / "results" / "bench_ffn"
                      / "h200.json").read_text())
  lax = [r for r in bench["rows"] if r["backend"] == "lax"]
  assert len(lax) > 50
  misses = 0
  for r in lax:
    model = model_config(r["model"])
    assert (model.d_model, model.d_ff_expert) == (r["d"], r["f"])
    got = {}
    for grouped in (False, True):
      one = ClusterConfig("h200", (dataclasses.replace(H200_SXM, grouped_kernel=grouped),),
                          ((1.0,),), ((0.0,),))
      hw = Hardware.build(model, one, edge_calibration("h200_grouped", one, model.name))
      rows_per = np.full((1, r["used"]), r["rows"] / r["used"])       # rows spread over used
      per_used = hw.expert_time(rows_per, server_axis=0).sum(axis=1)  # [1]
      got[grouped] = float(hw.compute_time(per_used, np.array([r["rows"]]),
                                           np.array([r["held_slots"]]), server_axis=0)[0])
    ratio = r["ms"] / 1e3 / got[False]
    assert 0.45 < ratio < 1.15, (r, ratio)
    misses += r["ms"] / 1e3 / got[True] > 3.0
  assert misses > 10


@pytest.mark.parametrize("cluster", [DENSE, MIXED], ids=["dense", "mixed"])
def test_refinement_prices_dense_servers_as_the_cost_model(cluster):
  """DanceMoE's refinement (LayerCost) equals CostModel.expected on held slots, needs the hosts
  to price them, and its refined score is the cost model's."""
  prob, a, batches, _ = _search_state(cluster)
  cost = CostModel.build(MODEL, cluster)
  lc = LayerCost.build(prob, batches, np.array([0.5, 0.5]))
  times = lc.phase_times(a.route, hosts=a.hosts)
  for i, phase in enumerate(("decode", "prefill")):
    np.testing.assert_allclose(times[i], cost.expected(prob, a, batches[i], phase).layer_time,
                               rtol=1e-12)
  with pytest.raises(PlacementError, match="pass hosts"):
    lc.phase_times(a.route)
  hosts, route, stats = refine(prob, a.hosts, lc)
  assert stats["score_after"] < stats["score_before"]
  new = Placement.from_hosts(hosts, MODEL, cluster, route=route)
  got = sum(0.5 * cost.expected(prob, new, batches[i], ph).layer_time.sum()
            for i, ph in enumerate(("decode", "prefill")))
  assert np.isclose(got, stats["score_after"], rtol=1e-12)
