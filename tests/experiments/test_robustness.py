"""The robustness report: home families, one instance end to end, verdicts, bad settings; the
goal summary of the tables (gaps.py) on rows whose arithmetic is known."""
import math

import pytest

from moe_edge.config import ConfigError
from moe_edge.experiments import robustness as rb
from moe_edge.experiments.gaps import goal_summary

DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")


def test_home_families():
  assert rb.family_homes("one_home", 4, DOMAINS) == ("arxiv", "book", "c4", "github")
  assert rb.family_homes("swap", 4, DOMAINS) == ("github", "c4", "book", "arxiv")
  mix = rb.family_homes("mix", 6, DOMAINS)
  assert mix[0] == {"arxiv": 0.5, "book": 0.5} and mix[4] == {"wikipedia": 0.5, "arxiv": 0.5}
  with pytest.raises(ConfigError, match="unknown home family"):
    rb.family_homes("ring", 4, DOMAINS)


@pytest.mark.parametrize("bad, match", [
    (dict(families=("ring",)), "unknown home families"),
    (dict(alphas=(1.2,)), "alphas must lie in"),
    (dict(model="small_moe"), "routing statistics"),
    (dict(request_rate=0.0), "request_rate must be positive"),
    (dict(seeds=()), "at least one")])
def test_bad_settings(bad, match):
  with pytest.raises(ConfigError, match=match):
    rb.RobustnessConfig(**bad)


def test_one_instance_compares_against_the_best_baseline(shared_data):
  cfg = rb.RobustnessConfig(tokens_per_server=256, model="mixtral_8x7b")
  rows = rb.instance_rows(cfg, "homogeneous_4", "mix", 0.8, 0)
  assert {r["method"] for r in rows} == set(rb.methods())
  (comp,) = rb.compare(rows, cfg)
  by = {r["method"]: r for r in rows}
  base = [m for m in rb.methods() if m not in ("prism", rb.OURS)]
  best = min(base, key=lambda m: by[m]["request_ms"])
  assert comp["best_baseline"] == best
  ratio = by[rb.OURS]["request_ms"] / by[best]["request_ms"]
  assert comp["vs_best_baseline"] == pytest.approx(ratio - 1)
  assert comp["verdict_best_baseline"] == rb.verdict(ratio, cfg.tie)
  assert all(math.isfinite(r["request_ms"]) for r in rows)  # 0.1 requests/s: stable queues
  assert rb.verdict(0.99, 1e-3) == "win" and rb.verdict(1.0005, 1e-3) == "tie"
  assert rb.verdict(1.01, 1e-3) == "loss" and rb.verdict(math.inf, 1e-3) == "loss"


def test_goal_summary_drops_settings_the_bound_rules_out():
  def row(setting, method, v, planned, bound):
    return dict(model=setting, cluster="c", method=method, status="ok", decode_ms=v,
                planned_decode_ms=planned, bound_decode_ms=bound)
  rows = [row("a", "ours", 70.0, 70.0, 50.0), row("a", "b1", 100.0, 100.0, 50.0),
          row("a", "b2", 120.0, 120.0, 50.0),
          # the bound (95) is above 0.8 x the best baseline's 100: 20% is out of reach
          row("b", "ours", 98.0, 98.0, 95.0), row("b", "b1", 100.0, 100.0, 95.0)]
  g = goal_summary(rows, "ours", ("b1", "b2"), 0.2, "decode_ms", "planned_decode_ms",
                   "bound_decode_ms")
  assert g["unreachable"] == ["b/c"]
  assert g["all"][1] == 2 and g["all"][0] == pytest.approx(1 - math.sqrt(0.7 * 0.98))
  assert g["reachable"] == (pytest.approx(0.3), 1)
