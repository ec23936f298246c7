"""Hardware: one home for every cost formula; the cost model, routing, objective and the
migration schedule price with it, calibrated when the problem or the cost model is."""
import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.core.errors import MoeEdgeError, PlacementError
from moe_edge.core.hardware import Hardware, HardwareError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.core.routing import route_table, route_table_reference
from moe_edge.cost import Calibration, CostModel, evaluate, expected_cost
from moe_edge.placement import migration, objective_terms
from moe_edge.placement.problem import link_time_per_token
from moe_edge.workload.stats_traces import sample_stats_trace

MODEL = model_config("mixtral_8x7b")


@pytest.fixture(scope="module")
def setting(shared_data):
  cluster = with_expert_memory(cluster_config("edge_hetero_4"), MODEL, 1.5)
  trace = sample_stats_trace("mixtral_8x7b", 4, 256, 0.8, 0, request_len=64)
  return cluster, trace


def test_formulas_are_the_documented_ones(setting):
  cluster, _ = setting
  cal = Calibration(np.array([0.5, 0.25, 1.0, 0.8]), np.array([0.9, 0.5, 0.7, 1.0]), "test",
                    tuple(s.name for s in cluster.servers))
  hw = Hardware.build(MODEL, cluster, cal)
  flops = cluster.peak_flops * cal.flops_efficiency
  mbw = cluster.mem_bandwidth * cal.bw_efficiency
  assert np.allclose(hw.expert_read, MODEL.expert_bytes / mbw)
  assert np.allclose(hw.expert_flop, MODEL.expert_flops_per_token / flops)
  count = np.array([0.0, 1.0, 500.0, 3.0])
  want = np.where(count > 0, np.maximum(hw.expert_read, count * hw.expert_flop), 0.0)
  assert np.allclose(hw.expert_time(count), want)
  assert np.allclose(hw.expert_time(count, expected=True),
                     np.maximum(hw.expert_read * (1 - np.exp(-count)), count * hw.expert_flop))
  lat = np.array(cluster.latency_matrix)
  np.fill_diagonal(lat, 0)
  link = 2 * (lat + MODEL.activation_bytes / cluster.bandwidth_matrix)
  assert np.allclose(hw.link_time_per_token(), link)
  assert np.allclose(hw.route_cost(), link + hw.expert_flop[None, :])
  # One token-choice 0 -> 2: dispatch = lat + a / bw, the combine the same back.
  flows = np.zeros((4, 4))
  flows[0, 2] = 1.0
  disp, comb = hw.exchange_times(flows)
  assert disp == pytest.approx(lat[0, 2] + MODEL.activation_bytes / cluster.bandwidth_matrix[0, 2])
  assert comb == pytest.approx(lat[2, 0] + MODEL.activation_bytes / cluster.bandwidth_matrix[2, 0])
  tokens = np.array([[3.0, 0.0, 1.0, 8.0]])
  dense = np.maximum(hw.dense_read, tokens * hw.dense_flop)
  assert hw.dense_time(tokens)[0] == pytest.approx(dense[0, [0, 2, 3]].max())


def test_the_migration_schedule_prices_copies_with_hardware(setting):
  cluster, _ = setting
  hw = Hardware.build(MODEL, cluster)
  copies = [(0, 1), (0, 2), (3, 1), (0, 1)]
  per_link = np.zeros((4, 4))
  for m, d in copies:
    per_link[m, d] += MODEL.expert_bytes
  old = migration._round_time(copies, MODEL.expert_bytes, cluster.bandwidth_matrix,
                              cluster.latency_matrix)
  assert hw.round_time(per_link) == old
  assert np.array_equal(hw.copy_time(MODEL.expert_bytes)[~np.eye(4, dtype=bool)],
                        (MODEL.expert_bytes / cluster.bandwidth_matrix
                         + cluster.latency_matrix)[~np.eye(4, dtype=bool)])


def test_problem_and_cost_model_use_one_calibrated_hardware(setting):
  cluster, trace = setting
  slow = Calibration.datasheet(cluster, flops_efficiency=0.01, bw_efficiency=1.0)
  plain = PlacementProblem.from_trace(trace, MODEL, cluster)
  cal = PlacementProblem.from_trace(trace, MODEL, cluster, calibration=slow)
  assert np.array_equal(plain.hardware.link_time_per_token(),
                        link_time_per_token(MODEL, cluster))
  hosts = np.zeros((4, MODEL.n_moe_layers, MODEL.n_experts), bool)
  hosts[np.arange(MODEL.n_experts) % 4, :, np.arange(MODEL.n_experts)] = True
  hosts[1] = True  # server 1 (an RTX 3090) holds every expert: a second replica of each
  r_plain = route_table(hosts, plain.hardware, plain.traffic)
  r_cal = route_table(hosts, cal.hardware, cal.traffic)
  assert np.array_equal(r_plain, route_table_reference(hosts, plain.hardware, plain.traffic))
  assert np.array_equal(r_cal, route_table_reference(hosts, cal.hardware, cal.traffic))
  assert not np.array_equal(r_plain, r_cal)  # at 1% FLOP efficiency compute outweighs links
  p = Placement.from_hosts(hosts, MODEL, cluster, cal.traffic, hardware=cal.hardware)
  assert np.array_equal(p.route, r_cal)
  # The objective's compute term is priced on the problem's hardware.
  t_plain = objective_terms(plain, Placement.from_hosts(hosts, MODEL, cluster, route=r_cal))
  t_cal = objective_terms(cal, Placement.from_hosts(hosts, MODEL, cluster, route=r_cal))
  assert t_cal["comm"] == pytest.approx(t_plain["comm"])
  assert t_cal["compute"] == pytest.approx(100 * t_plain["compute"])
  # CostModel == the function forms; expected_cost defaults to the problem's hardware.
  cm = CostModel.build(MODEL, cluster, slow)
  a, b = cm.evaluate(trace, p), evaluate(trace, MODEL, cluster, p, calibration=slow)
  assert a.latency == b.latency and a.cross_bytes == b.cross_bytes
  batch = np.full(4, 8.0)
  assert cm.expected(cal, p, batch).latency == pytest.approx(
      expected_cost(cal, p, batch).latency)
  assert expected_cost(cal, p, batch).latency > expected_cost(plain, p, batch).latency


def test_bad_hardware_inputs(setting):
  cluster, trace = setting
  with pytest.raises(HardwareError, match="activation_bytes"):
    Hardware.build(MODEL, cluster, activation_bytes=0)
  other = Hardware.build(MODEL, cluster_config("edge_hetero_8"))
  with pytest.raises(PlacementError, match="hardware describes 8 servers"):
    PlacementProblem.from_trace(trace, MODEL, cluster).with_hardware(other)
  with pytest.raises(MoeEdgeError, match="calibration has factors for 8 servers"):
    Hardware.build(MODEL, cluster, Calibration.datasheet(cluster_config("edge_hetero_8")))
