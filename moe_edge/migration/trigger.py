r"""The migration trigger: does a move pay for its transfer, and how much of a plan to make.

**Trigger** (:func:`should_migrate`). With ``t_cur`` and ``t_new`` the expected step latency
(:func:`moe_edge.cost.model.expected_cost` on the current statistics) of the current and the
candidate placement, ``S`` steps per interval and ``tau`` the transfer time::

  gain_s = (t_cur - t_new) * max(0, S - tau / t_cur)   # the new placement serves once copied
  cost_s = interference * tau                           # serving time lost while copying
  migrate  iff  moves > 0  and  gain_s > safety * cost_s

``interference`` is the fraction of serving time lost while weights are in flight (copies share
the links with the dispatch). The default 1.0 is the conservative bound "serving stalls for the
whole transfer"; the true value is smaller because copies run beside serving (where serving
does stop for the copy, as in the request-level simulator's migrations, 1.0 is exact).
``safety`` is a margin for what the formula leaves out (the horizon ``S`` is a guess of how
long the new statistics last; an in-sample saving is optimistic). With held-out savings and
the serving scoring below, ``safety = 1`` is the break-even rule: gain and cost are both
serving seconds of the same cluster, and a stall delays the queued requests as a slower step
does. The default 2.0 stays for the decode-only scoring, whose experiments were made with it. The saving
``t_cur - t_new`` is best estimated on statistics the candidate was not fitted to
(:func:`cross_validated_saving`): fitted and scored on one noisy window, a plan always looks
better than it is.

**How much to move** (:func:`choose_prefix`). A greedy plan lists its moves best first, so its
first ``k`` moves are the plan of budget ``k`` (:func:`plan_prefix`). The trigger judges every
prefix (``k = step, 2 step, ..., all``; savings held out per prefix by
:func:`cross_validated_savings`) and makes the approved one with the largest net gain
``gain_s - safety * cost_s``: a budget is an upper bound, not a quota, and copies whose saving
does not pay for their transfer are not made.

**What a step costs** (:data:`SCORINGS`, :func:`trigger_score`). ``t_cur``/``t_new`` come from a
*score*, a step-latency function of the placement:

* ``"decode"`` (the default; what ``results/migration`` and its ablations use):
  :func:`expected_latency`, one step of ``problem.tokens`` tokens per server -- the mean
  batch, as if every step were alike.
* ``"serving"``: :func:`mix_latency`, the mean expected step time over the step mix the
  scheduler formed (:class:`StepMix`: decode steps and prefill steps, counted and with their
  mean tokens per server, from the serving window), so the saving is the change of the
  serving seconds the workload pays::

    t(x) = sum_g n_g T(x, b_g) / sum_g n_g

  with ``n_g`` steps of group ``g`` (no server prefills; server ``m``'s prompt chunk is the
  largest), ``b_g [N]`` their mean tokens per server and ``T(x, b)`` the expected step latency
  (:func:`moe_edge.cost.model.expected_cost`) of ``x`` with ``b`` tokens per server. Then
  ``(t_cur - t_new) * S`` is the expected change of the serving time of the window's steps
  (prefill included), and ``tau / t_cur`` the steps lost while copying. A prompt chunk of 512
  tokens on one server makes that server's exchange the step's slowest: the mean batch of
  ``"decode"`` spreads it over every step and every server and underrates what the links cost
  (and what a replica saves) when prompts dominate the traffic.

"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import numpy as np

from moe_edge.cost.model import expected_cost
from moe_edge.migration.schedule import MovePlan, move_cost, move_sequence
from moe_edge.migration.slots import MigrationError, placement_with_slots
from moe_edge.core.problem import Placement, PlacementProblem

Score = Callable[[PlacementProblem, Placement], float]


SCORINGS = ("decode", "serving")


def expected_latency(problem: PlacementProblem, placement: Placement,
                     phase: str = "decode") -> float:
  """Expected step latency (s) of ``placement`` with ``problem.tokens`` tokens per server per
  step, from :func:`moe_edge.cost.model.expected_cost`."""
  return expected_cost(problem, placement, problem.tokens, phase).latency


@dataclasses.dataclass(frozen=True)
class StepMix:
  """The steps a scheduler formed, in groups that cost alike (module docstring, ``"serving"``).

  Attributes:
    steps: ``[G]`` steps per group (>= 0, not all 0).
    batches: ``[G, N]`` mean tokens per server of a step of each group (>= 0).
  """
  steps: np.ndarray
  batches: np.ndarray

  def __post_init__(self):
    steps = np.asarray(self.steps, dtype=np.float64)
    batches = np.asarray(self.batches, dtype=np.float64)
    if steps.ndim != 1 or batches.ndim != 2 or batches.shape[0] != steps.shape[0]:
      raise MigrationError(f"a step mix needs steps [G] and batches [G, N], got shapes "
                           f"{list(steps.shape)} and {list(batches.shape)}.")
    if not (np.all(np.isfinite(steps)) and np.all(steps >= 0) and steps.sum() > 0):
      raise MigrationError("a step mix needs finite steps >= 0 per group, not all 0; give it "
                           "a window in which something was served.")
    if not (np.all(np.isfinite(batches)) and np.all(batches >= 0)):
      raise MigrationError("a step mix needs finite tokens >= 0 per server and group.")
    object.__setattr__(self, "steps", steps)
    object.__setattr__(self, "batches", batches)

  @classmethod
  def from_totals(cls, steps: np.ndarray, tokens: np.ndarray) -> "StepMix":
    """From ``steps [G]`` and their summed ``tokens [G, N]`` (:meth:`Window.mix
    <moe_edge.serving.window.Window.mix>`); groups without steps are dropped."""
    steps, tokens = np.asarray(steps, np.float64), np.asarray(tokens, np.float64)
    if steps.ndim != 1 or tokens.shape[:1] != steps.shape:
      raise MigrationError(f"a step mix needs steps [G] and tokens [G, N], got shapes "
                           f"{list(steps.shape)} and {list(tokens.shape)}.")
    keep = steps > 0
    return cls(steps[keep], tokens[keep] / np.where(keep, steps, 1.0)[keep, None])


def mix_latency(problem: PlacementProblem, placement: Placement, mix: StepMix) -> float:
  """Mean expected step latency (s) of ``placement`` over ``mix``:
  ``sum_g n_g T(x, b_g) / sum_g n_g`` (module docstring); ``problem.tokens`` is not used."""
  if mix.batches.shape[1] != problem.shape[0]:
    raise MigrationError(f"the step mix has batches for {mix.batches.shape[1]} servers, the "
                         f"problem {problem.shape[0]}.")
  times = np.array([expected_cost(problem, placement, b).latency for b in mix.batches])
  return float(np.dot(mix.steps, times) / mix.steps.sum())


def trigger_score(scoring: str, mix: StepMix | None = None) -> Score:
  """The step-latency score of ``scoring`` (:data:`SCORINGS`, module docstring); ``"serving"``
  needs the window's ``mix``."""
  if scoring == "decode":
    return lambda p, x: expected_latency(p, x, "decode")
  if scoring == "serving":
    if not isinstance(mix, StepMix):
      raise MigrationError("scoring 'serving' needs the window's StepMix (the steps the "
                           "scheduler formed); pass mix=StepMix(...).")
    return lambda p, x: mix_latency(p, x, mix)
  raise MigrationError(f"unknown trigger scoring {scoring!r}; use one of {SCORINGS}.")


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether to migrate. ``gain_s``/``cost_s`` are serving seconds over one interval
  (module docstring); ``saving_per_step_s`` = ``t_cur - t_new``."""
  migrate: bool
  gain_s: float
  cost_s: float
  reason: str
  saving_per_step_s: float = 0.0
  move: MovePlan | None = None


def should_migrate(problem: PlacementProblem, current: Placement, candidate: Placement,
                   steps_per_interval: float, move: MovePlan | None = None,
                   safety: float = 2.0, interference: float = 1.0,
                   max_concurrent_per_link: int = 1, phase: str = "decode",
                   score: Score | None = None,
                   saving_per_step: float | None = None) -> Decision:
  """The migration trigger (formula in the module docstring).

  Args:
    problem: the *current* statistics (``freq``) and tokens per step per server.
    current, candidate: the placement in use and the proposed one.
    steps_per_interval: steps until the next decision.
    move: the schedule from ``current`` to ``candidate`` (computed when None).
    safety: the saving must exceed ``safety`` times the move cost.
    interference: fraction of serving time lost while weights are in flight.
    score: step latency function (default :func:`expected_latency` in ``phase``).
    saving_per_step: an estimate of ``t_cur - t_new`` made elsewhere, e.g. on held-out
      statistics by :func:`cross_validated_saving`. Default: both scored on ``problem``, which
      is optimistic when ``candidate`` was planned on the same statistics (it also fits their
      sampling noise).
  """
  if steps_per_interval <= 0 or safety < 0 or not 0 <= interference:
    raise MigrationError(f"need steps_per_interval > 0, safety >= 0 and interference >= 0, got "
                         f"{steps_per_interval}, {safety}, {interference}.")
  score = score or (lambda p, x: expected_latency(p, x, phase))
  if move is None:
    move = move_cost(current, candidate, problem.model, problem.cluster, problem.capacity,
                     max_concurrent_per_link)
  if move.moves == 0 and move.drops == 0:
    return Decision(False, 0.0, 0.0, "candidate equals the current placement", 0.0, move)
  t_cur = score(problem, current)
  if saving_per_step is None:
    saving = t_cur - score(problem, candidate)
  else:
    saving = float(saving_per_step)
  t_new = t_cur - saving
  cost = interference * move.seconds
  served = max(0.0, steps_per_interval - move.seconds / max(t_cur, 1e-12))
  gain = saving * served
  if saving <= 0:
    return Decision(False, gain, cost, f"no gain: step latency {1e3 * t_cur:.3f} ms -> "
                    f"{1e3 * t_new:.3f} ms", saving, move)
  if gain <= safety * cost:
    return Decision(False, gain, cost, f"gain {gain:.3f} s <= {safety:g} x move cost "
                    f"{cost:.3f} s ({move.moves} copies)", saving, move)
  return Decision(True, gain, cost, f"gain {gain:.3f} s > {safety:g} x move cost {cost:.3f} s "
                  f"({move.moves} copies, {move.bytes / 1e6:.1f} MB)", saving, move)


def cross_validated_saving(problem_a: PlacementProblem, problem_b: PlacementProblem,
                           current: Placement, plan: Callable[[PlacementProblem], Placement],
                           score: Score | None = None, phase: str = "decode") -> float:
  """Held-out estimate of the step-latency saving of re-planning (two-fold cross-validation).

  ``problem_a`` and ``problem_b`` carry the statistics of two disjoint halves of the window
  (:meth:`OnlineStats.window_halves`). A plan fitted on one half is scored on the other::

    saving = ( score(b, current) - score(b, plan(a)) + score(a, current) - score(a, plan(b)) ) / 2

  Scoring a plan on the sample it was fitted to rewards fitting that sample's noise: with a
  stationary workload it reports a gain that never materialises, and a trigger fed with it
  migrates every interval. The held-out estimate is near zero (or negative) then and large after
  a real shift.
  """
  # Every plan is its own longest prefix (plan_prefix returns it unchanged).
  return cross_validated_savings(problem_a, problem_b, current, plan, score, phase)(sys.maxsize)


@dataclasses.dataclass(frozen=True)
class PrefixChoice:
  """How many of a plan's moves to make (:func:`choose_prefix`).

  Attributes:
    moves: copies of the chosen prefix (0: do not migrate).
    decision: the trigger's :class:`Decision` for that prefix (for the whole plan when no
      prefix pays).
    table: ``((copies, saving_per_step_s, gain_s, cost_s), ...)`` for every prefix judged.
  """
  moves: int
  decision: Decision
  table: tuple[tuple[int, float, float, float], ...]

  @property
  def migrate(self) -> bool:
    return self.moves > 0


def plan_prefix(problem: PlacementProblem, current: Placement, plan: Placement,
                k: int) -> Placement:
  """The placement after the first ``k`` moves of ``plan`` (a :func:`plan_incremental` result
  for ``current``): those added replicas and their evictions, kept experts in their slots,
  the nearest-replica route on ``problem``'s traffic. A prefix of a valid move sequence is
  valid, so the result carries ``info["moves"]``/``info["evicted"]`` for :func:`move_sequence`
  like a plan of budget ``k`` (which the greedy's prefix is, up to a relocation cut in half)."""
  seq = move_sequence(plan)
  if not 0 <= k <= len(seq):
    raise MigrationError(f"prefix of {k} moves asked of a plan with {len(seq)}.")
  if k == len(seq):
    return plan
  hosts = current.hosts.copy()
  for a, v in seq[:k]:
    hosts[a] = True
    if v is not None:
      hosts[v] = False
  info = dict(plan.info, moves=[list(a) for a, _ in seq[:k]],
              evicted=[None if v is None else list(v) for _, v in seq[:k]], prefix_of=len(seq))
  info.pop("score_after", None)
  return placement_with_slots(hosts, current, problem.hardware, problem.traffic,
                              plan.method, info)


def prefix_grid(total: int, step: int) -> list[int]:
  """Prefix lengths ``step, 2 step, ..., total`` (always ending at ``total``; ``[total]`` when
  ``step <= 0``; ``[]`` when ``total == 0``)."""
  if total <= 0:
    return []
  if step <= 0:
    return [total]
  return [*range(step, total, step), total]


def choose_prefix(problem: PlacementProblem, current: Placement, plan: Placement,
                  steps_per_interval: float, savings: Callable[[int], float] | None = None,
                  step: int = 16, safety: float = 2.0, interference: float = 1.0,
                  max_concurrent_per_link: int = 1, phase: str = "decode",
                  score: Score | None = None) -> PrefixChoice:
  """The trigger applied to every prefix of a plan: make the prefix whose net gain is largest.

  A greedy plan ranks its moves best first, so its prefixes are the plans of smaller budgets.
  For each prefix of ``k`` copies (:func:`prefix_grid`) the trigger of :func:`should_migrate`
  weighs ``gain(k)`` against ``safety * cost(k)``; the choice is the approved prefix with the
  largest ``gain(k) - safety * cost(k)``, or no migration when none is approved. A move the
  workload does not pay for is not made, even when the budget would allow it; with ``step <= 0``
  only the whole plan is judged (all or nothing).

  Args:
    problem, current, plan: the statistics the plan was made on, the placement in use and the
      :func:`plan_incremental` result.
    steps_per_interval: serving steps the saving counts over (see :func:`should_migrate`).
    savings: ``k -> t_cur - t_new`` of the ``k``-move prefix, e.g. held out
      (:func:`cross_validated_savings`); default: scored on ``problem`` with ``score``.
    step: prefix resolution in copies.
    safety, interference, max_concurrent_per_link, phase, score: as in :func:`should_migrate`.
  """
  seq = move_sequence(plan)
  table, best, best_net, whole = [], None, -np.inf, None
  for k in prefix_grid(len(seq), step):
    cand = plan_prefix(problem, current, plan, k)
    move = move_cost(current, cand, problem.model, problem.cluster, problem.capacity,
                     max_concurrent_per_link, sequence=move_sequence(cand))
    dec = should_migrate(problem, current, cand, steps_per_interval, move, safety,
                         interference, max_concurrent_per_link, phase, score,
                         None if savings is None else float(savings(k)))
    table.append((k, dec.saving_per_step_s, dec.gain_s, dec.cost_s))
    whole = dec
    net = dec.gain_s - safety * dec.cost_s
    if dec.migrate and net > best_net:
      best, best_net = (k, dec), net
  if best is None:
    if whole is None:
      whole = Decision(False, 0.0, 0.0, "candidate equals the current placement")
    return PrefixChoice(0, whole, tuple(table))
  return PrefixChoice(best[0], best[1], tuple(table))


def cross_validated_savings(problem_a: PlacementProblem, problem_b: PlacementProblem,
                            current: Placement, plan: Callable[[PlacementProblem], Placement],
                            score: Score | None = None,
                            phase: str = "decode") -> Callable[[int], float]:
  """:func:`cross_validated_saving` for every prefix: ``k -> saving`` of the first ``k`` moves
  of the plans fitted on each half, scored on the other half (a plan shorter than ``k`` counts
  whole). The two plans are made once."""
  score = score or (lambda p, x: expected_latency(p, x, phase))
  plan_a, plan_b = plan(problem_a), plan(problem_b)
  base_a, base_b = score(problem_a, current), score(problem_b, current)

  def saving(k: int) -> float:
    pa = plan_prefix(problem_a, current, plan_a, min(k, len(plan_a.info["moves"])))
    pb = plan_prefix(problem_b, current, plan_b, min(k, len(plan_b.info["moves"])))
    return 0.5 * (base_b - score(problem_b, pa) + base_a - score(problem_a, pb))
  return saving
