r"""Runtime migration under workload drift: no migration vs full re-plan vs incremental.

Replays a drifting workload in intervals of ``--interval`` trace steps. By default the trace is
sampled from the real per-domain routing counts of OLMoE-1B-7B (``--source stats``): server ``i``
serves mostly domain ``DOMAINS[i]`` (share ``--alpha``) and the servers' home domains swap
(``--drift_preset pairs``: servers 0 and 1 after the first third, servers 2 and 3 after the
second; ``mix``: the same pairs instead both serve an even mix of their two homes; ``all``: every
neighbour pair, then a rotation of all homes; or ``--drift``).
``--source PATH`` replays a recorded trace instead (e.g. real text through the Flax model,
``experiments/collect_traces.py --drift ...``; its drift steps are read from its metadata).

Three policies serve every interval; each plans for the next interval from what it saw in this
one (the online statistics, :mod:`moe_edge.workload.online_stats`):

* ``none``: the initial DanceMoE placement (planned on interval 0) forever;
* ``full``: DanceMoE from scratch every interval;
* ``incremental``: :func:`moe_edge.placement.migration.plan_incremental`, at most
  ``--max_moves`` expert copies per interval. The trigger
  (:func:`~moe_edge.placement.migration.choose_prefix`, fed with the held-out savings of
  :func:`~moe_edge.placement.migration.cross_validated_savings`) judges a *campaign* of up to
  ``--horizon`` intervals: every prefix of ``k`` of its ``horizon x max_moves`` best-first
  copies (``k`` in steps of ``--prefix_step``; ``0`` = the whole campaign only, all or nothing)
  against the saving over the horizon, and approves the prefix with the largest net gain; the
  campaign then makes those copies, at most ``--max_moves`` per interval, re-planned on fresh
  statistics each interval.

Per interval and policy it reports local coverage and the cost model's step latency on the
interval's actual tokens (``moe_edge.cost.model.evaluate``), the expected latency on the
interval's statistics, and the expert copies (moves), bytes and transfer time of the migration
applied at the start of the interval. It writes ``intervals.csv``, ``summary.json`` and
``migration.png`` into ``--out`` and prints the goals: after each shift, coverage back to
>= 95% of the full re-plan's (same interval) within 2 intervals, with at most 25% of the expert
copies of the re-plan that follows the shift, next to a lower bound on the copies *any* plan
needs for that (:func:`~moe_edge.placement.migration.min_copies_for_coverage`).

``--fail_server n --fail_step s`` adds a failure drill on the incremental policy's placement at
step ``s``: reroute at once, re-load the experts only ``n`` held from storage, report the
recovery time and the experts unreachable meanwhile.

Example (about 40 s on two CPU cores)::

  python experiments/migration.py --fail_server 3 --fail_step 40

``experiments/migration_sweep.py`` runs it over seeds, drifts and budgets.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moe_edge.config import cluster_config, model_config, with_expert_memory
from moe_edge.cost.model import evaluate, expected_cost
from moe_edge import migration as mig
from moe_edge.placement import place
from moe_edge.placement.problem import Placement, PlacementProblem
from moe_edge.workload.corpus import DOMAINS
from moe_edge.workload.online_stats import OnlineStats
from moe_edge.workload.streams import DriftSchedule
from moe_edge.workload.traces import ActivationTrace

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "stats", "'stats' (sample from the real routing counts of "
                    "--model) or the path of a recorded ActivationTrace .npz.")
flags.DEFINE_string("model", "olmoe_1b_7b", "Model preset; for --source stats also the routing "
                    "statistics (olmoe_1b_7b or mixtral_8x7b).")
flags.DEFINE_string("cluster", "edge_hetero_4", "Cluster preset (configs/clusters/).")
flags.DEFINE_float("link_gbps", 1.0, "Link speed of the cluster preset (Gbit/s).")
flags.DEFINE_float("memory_copies", 1.5, "Expert memory of the cluster as full copies of the "
                   "model's experts (split by server memory); 0 = the servers' real memory.")
flags.DEFINE_float("alpha", 0.8, "Share of a server's requests from its home domain.")
flags.DEFINE_integer("seed", 0, "Seed of the sampled trace and of the placement methods.")
flags.DEFINE_integer("request_len", 64, "Tokens per request = tokens per server per step.")
flags.DEFINE_integer("steps", 96, "Trace steps (requests per server) for --source stats.")
flags.DEFINE_integer("interval", 8, "Trace steps per interval (the statistics window W).")
flags.DEFINE_string("drift", None, "Home changes 'step:home0,home1,...;...' (default: "
                    "--drift_preset).")
flags.DEFINE_enum("drift_preset", "pairs", ["pairs", "mix", "all"], "Default drift. pairs: "
                  "servers 0 and 1 swap homes at steps/3, servers 2 and 3 at 2*steps/3; mix: the "
                  "same pairs instead both serve an even mix of their two homes; all: every pair "
                  "of neighbours swaps at steps/3 and all homes rotate by one at 2*steps/3.")
flags.DEFINE_float("serving_steps_per_interval", 2000, "Serving steps an interval stands for "
                   "(the trigger weighs the saving over these against the transfer time).")
flags.DEFINE_integer("max_moves", 192, "Incremental policy: most expert copies per interval.")
flags.DEFINE_integer("horizon", 2, "Incremental policy: a migration the trigger approves is a "
                     "campaign of up to this many intervals of --max_moves copies each (judged "
                     "as a whole, re-planned on fresh statistics every interval).")
flags.DEFINE_integer("prefix_step", 16, "Trigger resolution: judge every prefix of this many "
                     "copies of the campaign's plan and make the one with the largest net gain "
                     "(0 = judge the whole plan only: all or nothing).")
flags.DEFINE_float("max_mb", None, "Incremental policy: most MB copied per interval.")
flags.DEFINE_float("safety", 2.0, "Trigger: migrate when gain > safety x move cost.")
flags.DEFINE_float("interference", 1.0, "Trigger: fraction of serving time lost while copying.")
flags.DEFINE_float("lam", 1.0, "Load-balance weight of the placement objective (DanceMoE and "
                   "the incremental planner).")
flags.DEFINE_enum("stats_kind", "window", ["window", "ema"], "Online statistics to plan on.")
flags.DEFINE_bool("cross_validate", True, "Trigger on the held-out (two-fold) saving estimate "
                  "instead of scoring the plan on the window it was fitted to.")
flags.DEFINE_float("ema_decay", 0.9, "EMA decay per trace step (for --stats_kind ema).")
flags.DEFINE_integer("max_concurrent_per_link", 1, "Weight copies a link carries at once.")
flags.DEFINE_integer("fail_server", -1, "Failure drill: server to lose (-1 = no drill).")
flags.DEFINE_integer("fail_step", -1, "Failure drill: trace step of the failure.")
flags.DEFINE_float("storage_gbps", 2.0, "Failure drill: checkpoint read bandwidth (GB/s).")
flags.DEFINE_float("coverage_target", 0.95, "Recovered = coverage >= target x the full "
                   "re-plan's.")
flags.DEFINE_integer("recovery_intervals", 2, "Goal: recovered within this many intervals.")
flags.DEFINE_float("move_fraction", 0.25, "Goal: at most this share of the full re-plan's moves.")
flags.DEFINE_string("out", "results/migration", "Output folder.")

POLICIES = ("none", "full", "incremental")


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def default_drift(num_servers: int, steps: int, interval: int,
                  preset: str = "pairs") -> DriftSchedule:
  """Two home changes at ~steps/3 and ~2 steps/3 (interval-aligned; see --drift_preset)."""
  homes = [DOMAINS[i % len(DOMAINS)] for i in range(num_servers)]
  at = [max(1, round(steps * f / 3 / interval)) * interval for f in (1, 2)]
  if preset in ("pairs", "mix"):
    if num_servers < 2:
      raise app.UsageError(f"--drift_preset {preset} needs at least two servers.")

    def change(cur, a, b):
      out = list(cur)
      if preset == "pairs":
        out[a], out[b] = cur[b], cur[a]
      else:
        out[a] = out[b] = {homes[a]: 0.5, homes[b]: 0.5}
      return out

    first = change(homes, 0, 1)
    second = change(first, *((2, 3) if num_servers >= 4 else (0, 1)))
    return DriftSchedule(((at[0], tuple(first)), (at[1], tuple(second))))
  swapped = list(homes)
  for i in range(0, num_servers - 1, 2):
    swapped[i], swapped[i + 1] = homes[i + 1], homes[i]
  rotated = homes[1:] + homes[:1]
  return DriftSchedule(((at[0], tuple(swapped)), (at[1], tuple(rotated))))


def load_workload(num_servers: int) -> tuple[ActivationTrace, list[int], str]:
  """``(trace, drift steps, model name)``."""
  if FLAGS.source == "stats":
    from moe_edge.workload.stats_traces import sample_stats_trace
    drift = (DriftSchedule.parse(FLAGS.drift) if FLAGS.drift
             else default_drift(num_servers, FLAGS.steps, FLAGS.interval, FLAGS.drift_preset))
    trace = sample_stats_trace(FLAGS.model, num_servers, FLAGS.steps * FLAGS.request_len,
                               FLAGS.alpha, FLAGS.seed, drift=drift,
                               request_len=FLAGS.request_len)
    return trace, [s for s, _ in drift.changes], FLAGS.model
  trace = ActivationTrace.load(FLAGS.source)
  shifts = []
  if FLAGS.drift:
    shifts = [s for s, _ in DriftSchedule.parse(FLAGS.drift).changes]
  else:
    try:
      note = json.loads(trace.note)
      if note.get("drift"):
        shifts = [s for s, _ in DriftSchedule.parse(note["drift"]).changes]
    except (json.JSONDecodeError, AttributeError):
      pass
  return trace, shifts, trace.model


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyState:
  """A policy's placement and the migration applied at the start of the current interval."""
  placement: Placement
  moves: int = 0            # expert copies
  changed: int = 0          # experts whose host set changed
  transfer_s: float = 0.0   # scheduled transfer time
  drift: float = 0.0        # mean TV distance of the statistics to the planned ones
  saving_ms: float = 0.0    # the trigger's estimate of the step-latency saving
  gain_s: float = 0.0       # the trigger's gain and cost over the interval
  cost_s: float = 0.0
  note: str = ""


def _problem(model, cluster, freq, tokens, capacity) -> PlacementProblem:
  return PlacementProblem.build(model, cluster, freq, tokens, capacity)


def replay(trace, model, cluster, capacity):
  """Run the three policies.

  Returns ``(rows, history, truths, failure_at)``: one row per interval and policy, each
  policy's placement per interval, each interval's actual statistics as a problem, and what
  the failure drill needs (or None).
  """
  n_srv = cluster.num_servers
  w = FLAGS.interval
  steps = int(trace.step.max()) + 1
  n_int = -(-steps // w)
  windows = [trace.window(i * w, (i + 1) * w) for i in range(n_int)]
  step_tokens = lambda win: win.tokens_per_server() / max(len(np.unique(win.step)), 1)  # noqa
  stats = OnlineStats(n_srv, model.n_moe_layers, model.n_experts, window=w,
                      decay=FLAGS.ema_decay)
  stats.update_steps(windows[0])
  first = _problem(model, cluster, stats.frequency(FLAGS.stats_kind), step_tokens(windows[0]),
                   capacity)
  t0 = time.time()
  initial = place("dancemoe", first, seed=FLAGS.seed, lam=FLAGS.lam)
  print(f"initial DanceMoE placement on interval 0: {time.time() - t0:.1f} s, objective "
        f"{mig.objective_value(first, initial, FLAGS.lam):.4f}")
  stats.mark_planned(kind=FLAGS.stats_kind)
  state = {p: PolicyState(initial) for p in POLICIES}
  campaign_left = 0  # intervals an approved incremental migration still runs
  rows, failure_at = [], None
  history, truths = {p: [] for p in POLICIES}, []
  for i, win in enumerate(windows):
    truth = _problem(model, cluster, win.frequency(), step_tokens(win), capacity)
    truths.append(truth)
    for name in POLICIES:
      st = state[name]
      history[name].append(st.placement)
      rep = evaluate(win, model, cluster, st.placement, "decode")
      exp = expected_cost(truth, st.placement, truth.tokens, "decode")
      rows.append(dict(
          policy=name, interval=i, first_step=i * w, coverage=rep.coverage,
          latency_ms=1e3 * rep.latency, expected_latency_ms=1e3 * exp.latency,
          objective=mig.objective_value(truth, st.placement, FLAGS.lam), moves=st.moves,
          mb_moved=st.moves * model.expert_bytes / 1e6, changed_experts=st.changed,
          transfer_s=st.transfer_s, drift=st.drift, saving_ms=st.saving_ms, gain_s=st.gain_s,
          cost_s=st.cost_s, note=st.note))
    if FLAGS.fail_server >= 0 and i * w <= FLAGS.fail_step < (i + 1) * w:
      failure_at = (i, state["incremental"].placement, truth, win)
    if i + 1 == n_int:
      break
    # Plan for interval i + 1 from what interval i showed.
    if i > 0:
      stats.update_steps(win)
    drift = float(stats.drift(FLAGS.stats_kind).mean())
    seen = _problem(model, cluster, stats.frequency(FLAGS.stats_kind), step_tokens(win),
                    capacity)
    state["none"] = PolicyState(initial)

    cur = state["full"].placement
    new = mig.full_replan(seen, cur, "dancemoe", seed=FLAGS.seed, lam=FLAGS.lam)
    plan = mig.move_cost(cur, new, model, cluster, capacity, FLAGS.max_concurrent_per_link)
    state["full"] = PolicyState(new, plan.moves, mig.changed_experts(cur, new), plan.seconds,
                                drift, note=f"re-plan; {plan.staged} staged copies"
                                if plan.staged else "re-plan")

    cur = state["incremental"].placement
    max_mb = None if FLAGS.max_mb is None else FLAGS.max_mb * 1e6
    def planner(prob, intervals=1, copies=None, cur=cur):
      """plan_incremental with ``intervals`` budgets (or ``copies`` copies, within one)."""
      return mig.plan_incremental(prob, cur, FLAGS.max_moves * intervals if copies is None
                                  else copies, None if max_mb is None else max_mb * intervals,
                                  lam=FLAGS.lam)

    if campaign_left > 0:
      # An approved campaign goes on: re-planned on the fresh statistics, with what is left of
      # the copies it was approved for (at most one budget per interval).
      allowed = min(FLAGS.max_moves, campaign_left)
      cand = planner(seen, copies=allowed)
      trig = dict(drift=drift, note=f"campaign continues ({campaign_left} copies approved)")
      made = len(cand.info["moves"])
      campaign_left = campaign_left - made if made == allowed else 0  # ends when nothing gains
      migrate = made > 0
    else:
      # The trigger judges the campaign's prefixes: k of its horizon x budget copies (best
      # first) against the saving they bring over the horizon; the best approved k is made,
      # one budget per interval.
      whole = planner(seen, FLAGS.horizon)
      savings = None
      if FLAGS.cross_validate:
        half_a, half_b = (_problem(model, cluster, f, step_tokens(win), capacity)
                          for f in stats.window_halves())
        savings = mig.cross_validated_savings(half_a, half_b, cur,
                                              lambda prob: planner(prob, FLAGS.horizon))
      choice = mig.choose_prefix(seen, cur, whole,
                                 FLAGS.serving_steps_per_interval * FLAGS.horizon, savings,
                                 FLAGS.prefix_step, FLAGS.safety, FLAGS.interference,
                                 FLAGS.max_concurrent_per_link)
      dec = choice.decision
      trig = dict(drift=drift, saving_ms=1e3 * dec.saving_per_step_s, gain_s=dec.gain_s,
                  cost_s=dec.cost_s, note=dec.reason)
      migrate = choice.migrate
      if migrate:
        first = min(choice.moves, FLAGS.max_moves)
        cand = mig.plan_prefix(seen, cur, whole, first)  # this interval's share
        campaign_left = choice.moves - first
    if migrate:
      plan = mig.move_cost(cur, cand, model, cluster, capacity, FLAGS.max_concurrent_per_link,
                           sequence=mig.move_sequence(cand))
      if not mig.hosted_at_every_moment(cur.hosts, plan.steps, capacity):
        raise mig.MigrationError("incremental plan would leave an expert unhosted; this is a bug.")
      state["incremental"] = PolicyState(cand, plan.moves, mig.changed_experts(cur, cand),
                                         plan.seconds, **trig)
      stats.mark_planned(kind=FLAGS.stats_kind)
    else:
      state["incremental"] = PolicyState(cur, **trig)
  return rows, history, truths, failure_at


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _series(rows, policy, key):
  return np.array([r[key] for r in rows if r["policy"] == policy])


def recovery(rows, history, truths, shifts, interval):
  """Per shift: intervals until the incremental policy's coverage is back to the target share
  of the full re-plan's (1 = the first interval planned after the shift), the copies each
  policy made to get there, and a lower bound on the copies *any* plan needs to recover within
  ``--recovery_intervals`` (:func:`moe_edge.placement.migration.min_copies_for_coverage` on the
  intervals' actual statistics, where coverage is exactly what the table reports), also from the
  re-plan policy's own placement before the shift. The same
  for the step latency: intervals until it is within ``1 / coverage_target`` of the re-plan's."""
  cov_i, cov_f = _series(rows, "incremental", "coverage"), _series(rows, "full", "coverage")
  lat_i, lat_f = _series(rows, "incremental", "latency_ms"), _series(rows, "full", "latency_ms")
  mv_i, mv_f = _series(rows, "incremental", "moves"), _series(rows, "full", "moves")
  n = len(cov_i)
  out = []
  for s in shifts:
    k = s // interval  # the interval the shift falls in
    if k + 1 >= n:
      continue
    nxt = [x for x in shifts if x > s]
    end = min(n, (nxt[0] // interval) + 1 if nxt else n)  # look no further than the next shift
    rec = None
    for j in range(k + 1, end):
      if cov_i[j] >= FLAGS.coverage_target * cov_f[j]:
        rec = j - k
        break
    rec_lat = next((j - k for j in range(k + 1, end)
                    if lat_i[j] <= lat_f[j] / FLAGS.coverage_target), None)
    upto = k + (rec if rec is not None else end - 1 - k)
    inc_moves = int(mv_i[k + 1:upto + 1].sum())
    full_moves = int(mv_f[k + 1])  # the one re-plan that adapts to the shift
    full_same = int(mv_f[k + 1:upto + 1].sum())  # the re-plan policy over the same intervals
    def fewest_copies(start):
      """Lower bound on the copies any plan from ``start`` needs to recover in time."""
      bounds = [mig.min_copies_for_coverage(truths[j], start, FLAGS.coverage_target * cov_f[j])
                for j in range(k + 1, min(end, k + 1 + FLAGS.recovery_intervals))]
      bounds = [b for b in bounds if b is not None]
      return min(bounds) if bounds else None

    need = fewest_copies(history["incremental"][k])
    need_full = fewest_copies(history["full"][k])  # from the re-plan policy's own placement
    out.append(dict(step=int(s), interval=int(k), intervals_to_recover=rec,
                    ratio_at_recovery=None if rec is None else float(cov_i[k + rec] /
                                                                      cov_f[k + rec]),
                    incremental_moves=inc_moves, full_replan_moves=full_moves,
                    move_share=inc_moves / full_moves if full_moves else None,
                    full_policy_moves_same_intervals=full_same,
                    min_copies_any_plan=need,
                    min_share_any_plan=need / full_moves if need is not None and full_moves
                    else None, min_copies_from_replan_state=need_full,
                    goal_met=rec is not None and rec <= FLAGS.recovery_intervals
                    and inc_moves <= FLAGS.move_fraction * full_moves,
                    goal_feasible=need is not None and need <= FLAGS.move_fraction * full_moves,
                    intervals_to_recover_latency=rec_lat,
                    moves_to_recover_latency=None if rec_lat is None
                    else int(mv_i[k + 1:k + rec_lat + 1].sum())))
  return out


def plot(rows, shifts, interval, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
  style = {"none": ("tab:gray", "--"), "full": ("tab:blue", "-"),
           "incremental": ("tab:red", "-")}
  for p in POLICIES:
    x = _series(rows, p, "first_step")
    c, ls = style[p]
    axes[0].plot(x, _series(rows, p, "coverage"), color=c, ls=ls, marker="o", ms=3, label=p)
    axes[1].plot(x, _series(rows, p, "latency_ms"), color=c, ls=ls, marker="o", ms=3, label=p)
    mv = _series(rows, p, "moves")
    axes[2].step(np.append(x, x[-1] + interval), np.append(mv, mv[-1]), color=c, ls=ls,
                 where="post", label=p)
  for ax in axes:
    for s in shifts:
      ax.axvline(s, color="k", lw=0.8, ls=":")
  axes[0].set_ylabel("local coverage")
  axes[1].set_ylabel("step latency (ms)\n(cost model)")
  axes[2].set_ylabel("expert copies\nat interval start")
  axes[2].set_xlabel(f"trace step (interval = {interval} steps; dotted: workload shifts)")
  axes[0].legend(loc="best")
  axes[0].set_title("Migration under workload drift")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def failure_drill(failure_at, model, cluster, capacity) -> dict:
  i, placement, truth, win = failure_at
  s = FLAGS.fail_server
  new, rep = mig.fail_server(placement, s, truth, FLAGS.storage_gbps * 1e9)
  rest = win.select(win.server != s)
  before = evaluate(rest, model, cluster, placement, "decode")
  after = evaluate(rest, model, cluster, new, "decode")
  print(f"\nFailure drill: server {s} ({cluster.servers[s].name}) fails in interval {i}")
  print(f"  replicas lost {rep.lost_replicas}; experts it held alone: {len(rep.orphans)} "
        f"(unreachable until re-loaded); {100 * rep.rerouted_share:.1f}% of the survivors' "
        f"token-choices rerouted at once to other replicas")
  print(f"  re-loaded {len(rep.reloads)} experts from storage ({rep.storage_bytes / 1e9:.2f} GB "
        f"at {FLAGS.storage_gbps:g} GB/s per server), evicting {len(rep.evicted)} replicas; "
        f"recovery time {rep.recovery_s:.2f} s")
  print(f"  survivors' coverage {before.coverage:.3f} before -> {after.coverage:.3f} after "
        f"recovery; step latency {1e3 * before.latency:.1f} -> {1e3 * after.latency:.1f} ms")
  return dict(server=s, interval=i, lost_replicas=rep.lost_replicas, orphans=len(rep.orphans),
              unreachable_during_recovery=len(rep.unreachable_during_recovery),
              rerouted_share=rep.rerouted_share, reloads=len(rep.reloads),
              evicted=len(rep.evicted), storage_gb=rep.storage_bytes / 1e9,
              recovery_s=rep.recovery_s, coverage_before=before.coverage,
              coverage_after=after.coverage, latency_ms_before=1e3 * before.latency,
              latency_ms_after=1e3 * after.latency)


def main(argv):
  del argv
  if FLAGS.interval <= 0 or FLAGS.request_len <= 0 or FLAGS.steps <= 0:
    raise app.UsageError("--interval, --request_len and --steps must be positive.")
  cluster = cluster_config(FLAGS.cluster, link_gbps=FLAGS.link_gbps)
  t_start = time.time()
  trace, shifts, model_name = load_workload(cluster.num_servers)
  model = model_config(model_name)
  if FLAGS.memory_copies > 0:
    cluster = with_expert_memory(cluster, model, FLAGS.memory_copies)
  capacity = cluster.expert_capacity(model)
  copies = capacity.sum() / (model.n_moe_layers * model.n_experts)
  print(f"{model.name} on {cluster.name}: N={cluster.num_servers}, L={model.n_moe_layers}, "
        f"E={model.n_experts}, expert {model.expert_bytes / 1e6:.1f} MB, capacity "
        f"{capacity.tolist()} experts ({copies:.2f} copies)")
  print(f"workload: {trace.num_tokens} tokens, {int(trace.step.max()) + 1} steps, interval "
        f"{FLAGS.interval} steps, shifts at steps {shifts}")
  rows, history, truths, failure_at = replay(trace, model, cluster, capacity)

  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "intervals.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
  plot(rows, shifts, FLAGS.interval, out / "migration.png")

  print(f"\n{'interval':>8} {'step':>5} | " + " | ".join(f"{p:^27}" for p in POLICIES))
  print(f"{'':>8} {'':>5} | " + " | ".join(f"{'cov':>6} {'lat ms':>8} {'moves':>5} {'GB':>5}"
                                             for _ in POLICIES))
  n_int = len(_series(rows, "none", "coverage"))
  for i in range(n_int):
    r = {x["policy"]: x for x in rows if x["interval"] == i}
    print(f"{i:>8} {i * FLAGS.interval:>5} | " + " | ".join(
        f"{r[p]['coverage']:>6.3f} {r[p]['latency_ms']:>8.2f} {r[p]['moves']:>5d} "
        f"{r[p]['mb_moved'] / 1e3:>5.2f}" for p in POLICIES))
  summary = dict(model=model.name, cluster=cluster.name, shifts=shifts, policies={})
  for p in POLICIES:
    mv = _series(rows, p, "moves")
    summary["policies"][p] = dict(
        mean_coverage=float(_series(rows, p, "coverage").mean()),
        mean_latency_ms=float(_series(rows, p, "latency_ms").mean()),
        total_moves=int(mv.sum()), total_gb=float(mv.sum() * model.expert_bytes / 1e9),
        total_transfer_s=float(_series(rows, p, "transfer_s").sum()))
  print("\nTotals over the run:")
  for p, s in summary["policies"].items():
    print(f"  {p:>11}: mean coverage {s['mean_coverage']:.3f}, mean step latency "
          f"{s['mean_latency_ms']:.2f} ms, {s['total_moves']} expert copies = "
          f"{s['total_gb']:.2f} GB of weights moved ({s['total_transfer_s']:.1f} s of transfers)")
  rec = recovery(rows, history, truths, shifts, FLAGS.interval)
  summary["recovery"] = rec
  print(f"\nAfter each shift (goal: coverage >= {FLAGS.coverage_target:.0%} of the full "
        f"re-plan's within {FLAGS.recovery_intervals} intervals, with <= "
        f"{FLAGS.move_fraction:.0%} of its expert moves):")
  ok_all = bool(rec)
  for r in rec:
    t = r["intervals_to_recover"]
    ok_all &= r["goal_met"]
    share = "n/a" if r["move_share"] is None else f"{r['move_share']:.0%}"
    need = r["min_copies_any_plan"]
    print(f"  shift at step {r['step']}: recovered after "
          f"{'never' if t is None else t} interval(s) (coverage ratio "
          f"{r['ratio_at_recovery'] or float('nan'):.3f}) with {r['incremental_moves']} copies vs "
          f"{r['full_replan_moves']} of the re-plan after the shift ({share}; the re-plan policy "
          f"made {r['full_policy_moves_same_intervals']} over the same intervals) -> "
          f"{'met' if r['goal_met'] else 'NOT met'}"
          + ("" if r["goal_met"] or r["goal_feasible"] else " (no plan can meet it: see the "
             "lower bound)"))
    print(f"    lower bound: any plan needs >= {need if need is not None else 'n/a'} copies to "
          f"recover within {FLAGS.recovery_intervals} intervals"
          + (f" ({r['min_share_any_plan']:.0%} of the re-plan's)"
             if r["min_share_any_plan"] is not None else "")
          + (f"; from the re-plan policy's placement before the shift >= "
             f"{r['min_copies_from_replan_state']} "
             f"({r['min_copies_from_replan_state'] / max(r['full_replan_moves'], 1):.0%})"
             if r["min_copies_from_replan_state"] is not None else ""))
    tl = r["intervals_to_recover_latency"]
    print(f"    step latency within {1 / FLAGS.coverage_target - 1:.0%} of the re-plan's after "
          + ("never" if tl is None else f"{tl} interval(s), {r['moves_to_recover_latency']} "
             f"copies ({r['moves_to_recover_latency'] / max(r['full_replan_moves'], 1):.0%})"))
  tot_i = summary["policies"]["incremental"]["total_moves"]
  tot_f = summary["policies"]["full"]["total_moves"]
  summary["total_move_share"] = tot_i / tot_f if tot_f else None
  summary["goals_met"] = ok_all
  print(f"  whole run: incremental copied {tot_i} experts, full re-plan {tot_f} "
        f"({'n/a' if not tot_f else f'{tot_i / tot_f:.0%}'}); goals "
        f"{'met' if ok_all else 'NOT met'}")
  if failure_at is not None:
    summary["failure"] = failure_drill(failure_at, model, cluster, capacity)
  elif FLAGS.fail_server >= 0:
    print(f"\nFailure drill skipped: --fail_step {FLAGS.fail_step} is outside the trace.")
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"\nwrote {out / 'intervals.csv'}, {out / 'summary.json'}, {out / 'migration.png'} "
        f"({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
  app.run(main)
