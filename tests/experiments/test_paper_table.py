"""The paper experiment end to end on a tiny run: rows, outputs, README, bad input."""
import dataclasses
import math

import numpy as np
import pytest

from moe_edge.config import ConfigError, load_preset, model_config
from moe_edge.core.errors import PlacementError
from moe_edge.experiments import paper_report as rep
from moe_edge.experiments import paper_table as pt
from moe_edge.experiments.paper_config import paper_config
from moe_edge.experiments.paper_readme import load_parts, write_outputs
from moe_edge.experiments import paper_workload as pw
from moe_edge.placement import registry
from moe_edge.workload.standin import routing_stats_for
from moe_edge.workload.stats_traces import layer_distributions


@pytest.fixture(scope="module")
def tiny():
  cfg = paper_config(load_preset("experiments", "paper_testbed_quick"))
  return dataclasses.replace(cfg, duration_s=40.0, profile_duration_s=40.0,
                             methods=("uniform_ep", "eplb_hetero", "prism"), include_ours=False,
                             light_load_factor=2.0)


@pytest.fixture(scope="module")
def setting_rows(tiny):
  return pt.run_setting(tiny, "deepseek_v2_lite", "specialised", list(tiny.methods), 0)


def test_rows_have_the_table_columns_and_the_standin_note(tiny, setting_rows):
  rows, lat, light = setting_rows
  assert [r["method"] for r in rows] == list(tiny.methods)
  rows = rep.add_gaps([dict(r) for r in rows])
  for r in rows:
    assert set(rep.TABLE_COLUMNS) <= set(r)
    assert "OLMoE-1B-7B" in r["note"]            # the stand-in is stated in every row
    assert r["p50_latency_s"] <= r["p99_latency_s"]
    assert 0 < r["coverage"] <= 1 and r["gap_to_best_known"] >= 0
    assert r["mean_latency_s"] == pytest.approx(lat[r["method"]].mean())
  assert min(r["gap_to_best_known"] for r in rows) == 0.0
  # the same requests for every method: request counts agree
  assert len({r["requests"] for r in rows}) == 1
  assert set(light) == {"prism", "eplb_hetero"}


def test_outputs_and_readme_put_our_ratio_beside_the_papers(tiny, setting_rows, tmp_path):
  rows, lat, light = setting_rows
  paths = write_outputs(tiny, tmp_path, [dict(r) for r in rows],
                        {("deepseek_v2_lite", "specialised"): lat}, None, None, "cmd", 1.0,
                        {("deepseek_v2_lite", "specialised"): light})
  names = {p.name for p in paths}
  assert {"table.csv", "latencies.csv", "README.md", "summary.json",
          "cdf_deepseek_v2_lite_specialised.png"} <= names
  text = (tmp_path / "README.md").read_text()
  assert "-30.6%" in text and "OLMoE-1B-7B" in text
  ours = rep.change(*(next(r["mean_latency_s"] for r in rows if r["method"] == m)
                      for m in ("prism", "eplb_hetero")))
  assert f"{100 * ours:+.1f}%" in text
  back = load_parts(tmp_path)["table"]
  assert [r["method"] for r in back[0]] == [r["method"] for r in rows]
  np.testing.assert_allclose(back[1][("deepseek_v2_lite", "specialised")]["prism"],
                             lat["prism"])


def test_unservable_rate_is_reported_not_run_forever(tiny):
  fast = dataclasses.replace(tiny, max_waiting=3, duration_s=30.0, workloads=tuple(
      dataclasses.replace(w, interarrival_s=0.2) for w in tiny.workloads))
  planned = pt.plan_setting(tiny, "mixtral_8x7b", "specialised", 0)
  s = dataclasses.replace(planned.setting, workload=fast.workload("specialised"))
  req = pw.workload_requests(fast, s.workload, s.cluster.num_servers, 30.0, 0)
  with pytest.raises(pt.QueueDivergesError, match="queue diverges") as e:
    pt.serve(fast, s, planned.cost, pt.registry.place("uniform_ep", planned.problem), req, 0)
  assert "\n" not in str(e.value)
  row = pt.result_row(planned, "uniform_ep", None, f"queue diverges: {e.value}")
  assert math.isinf(row["mean_latency_s"]) and row["note"].startswith("queue diverges")


def test_testbed_that_cannot_hold_every_expert_is_one_line(tiny):
  low = dataclasses.replace(tiny, memory_fraction=(("deepseek_v2_lite", 0.3),
                                                   ("mixtral_8x7b", 0.4)))
  with pytest.raises(ConfigError, match="memory_fraction 0.4 for mixtral_8x7b") as e:
    pw.testbed_cluster(low, "mixtral_8x7b")
  assert "\n" not in str(e.value)


def test_workload_domain_the_statistics_lack_is_one_line(tiny):
  stats, _ = routing_stats_for("deepseek_v2_lite")
  fewer = dataclasses.replace(stats, domains=("arxiv", "book", "c4", "x", "wikipedia"))
  with pytest.raises(ConfigError, match=r"draws requests from \['github'\]") as e:
    pw.stats_rows(fewer, tiny.workload("specialised"))
  assert "\n" not in str(e.value)
  cluster = pw.testbed_cluster(tiny, "deepseek_v2_lite")
  p = pw.expected_problem(model_config("deepseek_v2_lite"), cluster, stats, tiny,
                       tiny.workload("specialised"))
  # specialised (alpha 1): each server's frequencies are exactly its home domain's
  dist = layer_distributions(stats)
  np.testing.assert_allclose(p.freq[0], 6 * dist[stats.domains.index("github")])


def test_unknown_method_is_one_line(tiny):
  bad = dataclasses.replace(tiny, methods=("uniform_ep", "magic"))
  with pytest.raises(ConfigError, match=r"methods \['magic'\] are not registered"):
    pt.table_methods(bad)


@pytest.fixture(scope="module")
def judged_plan(tiny):
  return pt.plan_setting(tiny, "deepseek_v2_lite", "specialised", 0, judge=True)


def test_latency_search_ends_with_the_judges_fastest_candidate(judged_plan):
  """With the pilot's judge (a simulation on the profiling requests), latency_search returns
  the candidate that simulation finds fastest, never one it finds slower than the search's own
  result or than prism (one of its starts); without a judge it is the plain search."""
  planned = judged_plan
  ctx = planned.context
  chosen = registry.place("latency_search", planned.problem, context=ctx)
  judged = chosen.info["judged"]
  assert set(judged) == {"latency_search", "dancemoe", "eplb_hetero", "eplb", "uniform_ep",
                         "prism"}
  assert judged[chosen.info["judged_from"]] == min(judged.values())
  assert math.isclose(ctx.judge(chosen), min(judged.values()))
  assert ctx.judge(chosen) <= ctx.judge(registry.place("prism", planned.problem, context=ctx))
  plain = registry.place("latency_search", planned.problem, {"judge_final": False}, ctx)
  assert ctx.judge(chosen) <= ctx.judge(plain)
  no_judge = dataclasses.replace(ctx, judge=None)
  again = registry.place("latency_search", planned.problem, context=no_judge)
  np.testing.assert_array_equal(again.hosts, plain.hosts)
  assert "judged" not in again.info


def test_a_judge_that_returns_nan_is_one_line(judged_plan):
  planned = judged_plan
  ctx = dataclasses.replace(planned.context, judge=lambda p: math.nan)
  with pytest.raises(PlacementError, match="the judge returned NaN"):
    registry.place("latency_search", planned.problem, context=ctx)
