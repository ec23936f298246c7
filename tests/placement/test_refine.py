"""DanceMoE's latency refinement (moe_edge/placement/refine.py) against the cost model."""
import numpy as np
import pytest

from _placement_cases import CASES, make_problem
from moe_edge.cost import expected_cost
from moe_edge.placement import place
from moe_edge.placement.problem import PlacementError
from moe_edge.placement.refine import LayerCost, phase_batches
from test_methods import olmoe_problem


def test_layer_times_equal_expected_cost():
  problem = olmoe_problem()
  p = place("dancemoe", problem, refine=False)
  batch, _ = phase_batches(problem, "both", 8.0, 128.0)
  cost = LayerCost.build(problem, batch, np.ones(2))
  times = cost.phase_times(p.route)
  for i, phase in enumerate(("decode", "prefill")):
    rep = expected_cost(problem, p, batch[i], phase)
    np.testing.assert_allclose(times[i], rep.layer_time, rtol=1e-12)


@pytest.mark.parametrize("phase", ["decode", "prefill", "both"])
def test_refinement_lowers_the_expected_latency_it_optimises(phase):
  problem = olmoe_problem()
  old = place("dancemoe", problem, refine=False)
  new = place("dancemoe_refined", problem, refine_phase=phase)
  new.validate(problem)  # capacity respected, route consistent
  assert np.all(new.hosts.sum(axis=0) >= 1)  # every expert stays hosted
  assert np.all(new.experts_per_server <= problem.capacity)
  batch, _ = phase_batches(problem, phase, 8.0, 128.0)
  lat = {ph: [expected_cost(problem, p, batch[i], ph).latency for p in (old, new)]
         for i, ph in enumerate(("decode", "prefill"))}
  stats = new.info["refine_stats"]
  assert stats["score_after"] < stats["score_before"]
  if phase == "decode":
    assert lat["decode"][1] < lat["decode"][0]
  elif phase == "prefill":
    assert lat["prefill"][1] < lat["prefill"][0]
  else:  # equal weights on relative change: the sum of relative latencies (dense part fixed)
    rel = sum(lat[ph][1] / lat[ph][0] for ph in lat)
    assert rel < 2.0


@pytest.mark.parametrize("case", range(len(CASES)))
def test_refine_off_is_the_unrefined_placement_and_on_stays_feasible(case):
  problem = make_problem(**CASES[case])
  off = place("dancemoe", problem, refine=False)
  on = place("dancemoe_refined", problem)
  assert place("dancemoe", problem) == off  # the default is the unrefined method
  assert off.info["refine"] is False and "refine_stats" not in off.info
  assert on.info["refine"] is True and on.method == "dancemoe_refined"
  on.validate(problem)
  np.testing.assert_array_less(0, on.hosts.sum(axis=0))
  # refine=False only stops after step 5: the same hosts as the unrefined steps give.
  no_refine_rounds = place("dancemoe_refined", problem, refine_rounds=0)
  assert no_refine_rounds == off


def test_refinement_skips_large_instances_and_checks_options():
  problem = olmoe_problem()
  p = place("dancemoe_refined", problem, refine_max_size=10)
  assert "refine_skipped" in p.info
  assert p == place("dancemoe", problem, refine=False)
  with pytest.raises(PlacementError, match="refine_phase"):
    place("dancemoe_refined", problem, refine_phase="train")
  with pytest.raises(PlacementError, match="decode_tokens"):
    place("dancemoe_refined", problem, decode_tokens=0.0)
  with pytest.raises(PlacementError, match="always refines"):
    place("dancemoe_refined", problem, refine=False)
