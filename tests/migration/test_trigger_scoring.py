"""The trigger's 'serving' scoring: the window's step mix equals the simulated steps; on a
prefill-dominated workload its saving is the simulated change of serving time (the mean-batch
'decode' score's is not), it approves a plan the 'decode' score rejects, and the approved
migration lowers the simulated latency; bad step mixes, scorings and options are one line."""
import math

import numpy as np
import pytest

from moe_edge import migration as mig
from moe_edge.config import ConfigError, cluster_config, load_preset, model_config
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.cost.model import CostModel
from moe_edge.experiments.paper_config import paper_config
from moe_edge.serving.scheduler import SchedulerOptions
from moe_edge.serving.simulator import SampledRouting, simulate
from moe_edge.workload.requests import make_requests
from moe_edge.workload.stats_traces import load_routing_stats

MODEL = model_config("olmoe_1b_7b")
N, L, E = 3, MODEL.n_moe_layers, MODEL.n_experts
OPTS = SchedulerOptions(max_batch=4, token_budget=512, prefill_chunk=512, kv_tokens=8 * 4096)


def _requests(seed):
  """Prefill-dominated: prompts of 384-512 tokens, 4 output tokens, one home per server."""
  return make_requests(N, (384, 512), 4, seed=seed, rate=0.2, duration_s=60.0, alpha=1.0,
                       home_domains=("github", "arxiv", "wikipedia"))


@pytest.fixture(scope="module")
def served():
  """A window served on round-robin sole copies (room for 96 more experts per server): its
  problem (counts per token, tokens per step), step mix, steps, and what serving needs."""
  cluster = cluster_config("homogeneous_4", num_servers=N, link_gbps=2.0)
  cost = CostModel.build(MODEL, cluster)
  stats = load_routing_stats("olmoe_1b_7b")
  hosts = np.zeros((N, L, E), bool)
  hosts[np.arange(E) % N, :, np.arange(E)] = True
  capacity = np.full(N, L * E // N + 96)
  flat = PlacementProblem.build(MODEL, cluster, np.full((N, L, E), MODEL.top_k / E), np.ones(N),
                                capacity)
  current = Placement.from_hosts(hosts, MODEL, cluster, flat.traffic)
  reqs = _requests(0)
  res = simulate(reqs, current, cost, OPTS, SampledRouting(stats, reqs.domain, 0, 256), bin_s=5.0)
  counts, tokens, steps = res.window.totals(0.0, math.inf)
  problem = PlacementProblem.build(MODEL, cluster, counts / tokens[:, None, None], tokens / steps,
                                   capacity)
  mix = mig.StepMix.from_totals(*res.window.mix(0.0, math.inf))
  return dict(cost=cost, stats=stats, current=current, result=res, problem=problem, mix=mix,
              steps=float(steps))


def test_window_step_mix_equals_the_simulated_steps(served):
  res = served["result"]
  pre = np.array([s.prefill_tokens for s in res.steps])                 # [S, N]
  fed = pre + np.array([s.decode_tokens for s in res.steps])
  steps, tokens = res.window.mix(0.0, math.inf)
  for g in range(N + 1):
    sel = np.all(pre == 0, axis=1) if g == 0 else (pre.max(axis=1) > 0) & (
        np.argmax(pre, axis=1) == g - 1)
    assert steps[g] == sel.sum()
    np.testing.assert_array_equal(tokens[g], fed[sel].sum(axis=0))
  assert steps[0] > 0 and np.all(steps[1:] > 0)           # decode and prefill steps both seen
  assert steps.sum() == len(res.steps)


def _busy(served, placement, seed):
  reqs = _requests(seed)
  res = simulate(reqs, placement, served["cost"], OPTS,
                 SampledRouting(served["stats"], reqs.domain, seed, 256))
  return sum(s.duration_s for s in res.steps)


def test_serving_score_predicts_serving_time_and_approves_what_decode_rejects(served):
  prob, cur, mix, steps = served["problem"], served["current"], served["mix"], served["steps"]
  plan = mig.plan_incremental(prob, cur, 64)
  serving, decode = mig.trigger_score("serving", mix), mig.trigger_score("decode")
  predicted = {name: steps * (score(prob, cur) - score(prob, plan))
               for name, score in (("serving", serving), ("decode", decode))}
  actual = _busy(served, cur, 0) - _busy(served, plan, 0)     # the window's requests again
  assert actual > 0
  assert predicted["serving"] == pytest.approx(actual, rel=0.2)
  assert predicted["decode"] < 0.75 * actual                  # the mean batch underrates it
  # At the default safety factor the mean-batch score rejects the plan, 'serving' approves it.
  by_decode = mig.should_migrate(prob, cur, plan, steps, score=decode)
  by_serving = mig.should_migrate(prob, cur, plan, steps, score=serving)
  assert not by_decode.migrate and by_serving.migrate
  # The approved migration, stall included, lowers the latency of the next requests.
  reqs = _requests(1)
  routing = SampledRouting(served["stats"], reqs.domain, 1, 256)
  moved = simulate(reqs, cur, served["cost"], OPTS, routing,
                   controller=lambda t, w, x: (plan, by_serving.move.seconds) if x is cur
                   else (None, 0.0), check_every_s=1.0)
  kept = simulate(reqs, cur, served["cost"], OPTS,
                  SampledRouting(served["stats"], reqs.domain, 1, 256))
  assert len(moved.migrations) == 1
  assert moved.latencies().mean() < 0.9 * kept.latencies().mean()


@pytest.mark.parametrize("make, match", [
    (lambda: mig.StepMix(np.ones(2), np.ones((3, 3))), r"steps \[G\] and batches \[G, N\]"),
    (lambda: mig.StepMix(np.zeros(2), np.ones((2, 3))), "not all 0"),
    (lambda: mig.StepMix(np.array([1.0, -1.0]), np.ones((2, 3))), "steps >= 0"),
    (lambda: mig.StepMix(np.ones(2), np.full((2, 3), np.nan)), "finite tokens >= 0"),
    (lambda: mig.StepMix.from_totals(np.ones(2), np.ones((3, 3))), r"tokens \[G, N\]"),
    (lambda: mig.trigger_score("prefill"), "unknown trigger scoring 'prefill'"),
    (lambda: mig.trigger_score("serving"), "needs the window's StepMix"),
])
def test_bad_step_mix_and_scoring_are_one_line(make, match):
  with pytest.raises(mig.MigrationError, match=match) as e:
    make()
  assert "\n" not in str(e.value)


def test_step_mix_of_another_cluster_is_refused(served):
  wrong = mig.StepMix(np.ones(1), np.ones((1, N + 1)))
  with pytest.raises(mig.MigrationError, match="batches for 4 servers, the problem 3"):
    mig.mix_latency(served["problem"], served["current"], wrong)


@pytest.mark.parametrize("key, value, match", [
    ("ours_scoring", "prefill", r"ours_scoring='prefill'; use one of \('decode', 'serving'\)"),
    ("ours_safety", -1.0, "ours_safety must be a finite number >= 0"),
    ("ours_interference", float("nan"), "ours_interference must be a finite number >= 0"),
])
def test_paper_config_rejects_bad_trigger_options(key, value, match):
  c = load_preset("experiments", "paper_testbed_quick").copy_and_resolve_references()
  c[key] = value
  with pytest.raises(ConfigError, match=match) as e:
    paper_config(c)
  assert "\n" not in str(e.value)
