"""The calibrated part of the paper experiment: scaling every modelled time by ``s`` is exactly a
change of time unit (a simulation with times x2 and arrivals x2 gives latencies x2), the fit
finds the scale that gives the baseline the paper's latency, the README reports it, and bad
input is refused."""
import dataclasses
import math

import numpy as np
import pytest

from moe_edge.config import ConfigError, load_preset
from moe_edge.core.hardware import HardwareError
from moe_edge.experiments import paper_calibrated as pc
from moe_edge.experiments import paper_report as rep
from moe_edge.experiments import paper_table as pt
from moe_edge.experiments.paper_config import paper_config
from moe_edge.experiments.paper_readme import load_parts, write_outputs
from moe_edge.experiments.paper_workload import workload_requests
from moe_edge.placement import registry


@pytest.fixture(scope="module")
def tiny():
  cfg = paper_config(load_preset("experiments", "paper_testbed_quick"))
  return dataclasses.replace(cfg, duration_s=40.0, profile_duration_s=40.0,
                             methods=("eplb_hetero", "prism"), include_ours=False,
                             calibrated_methods=("eplb_hetero", "prism"))


@pytest.fixture(scope="module")
def planned(tiny):
  return pt.plan_setting(tiny, "deepseek_v2_lite", "specialised", 0)


def test_time_scale_is_a_change_of_time_unit(tiny, planned):
  n = planned.setting.cluster.num_servers
  req = workload_requests(tiny, planned.setting.workload, n, tiny.duration_s, 0)
  slow = dataclasses.replace(req, arrival_s=2.0 * req.arrival_s)
  place = registry.place("eplb_hetero", planned.problem, context=planned.context)
  a = pt.serve(tiny, planned.setting, planned.cost, place, req, 0)
  b = pt.serve(tiny, planned.setting, pc.scaled(planned.cost, 2.0), place, slow, 0)
  assert len(a.steps) == len(b.steps) > 0
  np.testing.assert_allclose(b.latencies(), 2.0 * a.latencies(), rtol=1e-9)
  assert b.cross_bytes == a.cross_bytes


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan, math.inf])
def test_bad_time_scale_is_refused(planned, factor):
  with pytest.raises(HardwareError, match="positive finite"):
    planned.cost.hardware.time_scaled(factor)


def test_fit_finds_the_scale_and_refuses_a_target_out_of_reach():
  s, f = pc.fit_time_scale(lambda x: 3.0 * x + 0.1, 1.6)
  assert abs(f - 1.6) <= 5e-3 * 1.6 and abs(s - 0.5) < 0.01
  with pytest.raises(ValueError, match="widen the bracket"):
    pc.fit_time_scale(lambda x: 3.0 * x + 0.1, 0.05)
  with pytest.raises(ValueError, match="positive number"):
    pc.fit_time_scale(lambda x: x, -1.0)


def test_calibrated_setting_fits_the_baseline_and_the_readme_reports_it(tiny, tmp_path):
  rows = pc.run_calibrated_setting(tiny, "deepseek_v2_lite", "specialised",
                                   ["eplb_hetero", "prism"], 0)
  paper = rep.PAPER_LATENCY[("deepseek_v2_lite", "specialised")]
  assert {r["method"] for r in rows} == {"eplb_hetero", "prism"}
  assert all(r["time_scale"] == rows[0]["time_scale"] > 0 for r in rows)
  assert abs(rows[0]["fit_eplb_s"] - paper[0]) <= 5e-3 * paper[0]
  (c,) = pc.comparison(rows)
  assert c["prism_change"] == pytest.approx(rep.change(c["prism_s"], c["eplb_s"]))
  write_outputs(tiny, tmp_path, [], {}, None, None, "cmd", 1.0, None, rows)
  text = (tmp_path / "README.md").read_text()
  assert "Calibrated to the paper's baseline" in text
  assert f"{rows[0]['time_scale']:.3g}" in text
  back = load_parts(tmp_path)["calibrated"]
  assert [r["mean_latency_s"] for r in back] == pytest.approx([r["mean_latency_s"] for r in rows])


def test_calibrated_methods_without_the_baseline_are_refused():
  cd = load_preset("experiments", "paper_testbed_quick")
  cd.calibrated_methods = ("prism",)
  with pytest.raises(ConfigError, match="calibrated_methods must include eplb_hetero"):
    paper_config(cd)


def test_sweep_varies_one_knob_at_a_time_and_reports_it(tiny, tmp_path):
  from moe_edge.experiments import paper_sweep as sw
  cfg = dataclasses.replace(tiny, sweep_settings=("deepseek_v2_lite:specialised",),
                            sweep_alphas=(1.0, 0.5), sweep_prompt_tokens=((32, 64),),
                            sweep_output_tokens=(), sweep_methods=("eplb_hetero", "prism"),
                            sweep_duration_s=30.0)
  knobs = [(k, v) for k, v, _ in sw.variants(cfg, "specialised")]
  assert knobs == [("base", "configured"), ("alpha", "0.5"), ("prompt_tokens", "32-64")]
  rows = sw.run_sweep(cfg, log=lambda s: None)
  assert len(rows) == 3 * 2
  alpha = {r["value"]: r["alpha"] for r in rows}
  assert alpha == {"configured": 1.0, "0.5": 0.5, "32-64": 1.0}
  assert all(r["vs_eplb_hetero"] == 0.0 for r in rows if r["method"] == "eplb_hetero")
  assert {r["prompt_hi"] for r in rows if r["knob"] == "prompt_tokens"} == {64}
  write_outputs(cfg, tmp_path, [], {}, None, None, "cmd", 1.0, None, None, rows)
  text = (tmp_path / "README.md").read_text()
  assert "## Ablation: the workload's knobs" in text
  assert "| deepseek_v2_lite specialised | alpha | 0.5 |" in text
  assert len(load_parts(tmp_path)["sweep"]) == len(rows)


@pytest.mark.parametrize("key, value, match", [
    ("sweep_settings", ("deepseek_v2_lite",), "must be 'model:workload'"),
    ("sweep_settings", ("deepseek_v2_lite:bogus",), "must be 'model:workload'"),
    ("sweep_methods", ("prism",), "sweep_methods must include eplb_hetero"),
    ("sweep_alphas", (1.5,), "sweep_alphas must lie in"),
    ("sweep_prompt_tokens", ((64, 32),), "sweep_prompt_tokens must be"),
    ("sweep_output_tokens", (0,), "sweep_output_tokens must be"),
])
def test_bad_sweep_config_is_one_line(key, value, match):
  cd = load_preset("experiments", "paper_testbed_quick")
  cd[key] = value
  with pytest.raises(ConfigError, match=match):
    paper_config(cd)
