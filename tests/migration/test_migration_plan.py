"""Migration planning: slots, move schedules, the trigger, budgets and the failure drill."""
import numpy as np
import pytest

from moe_edge.config import cluster_config, model_config
from moe_edge import migration as mig
from moe_edge.placement.objective import objective
from moe_edge.placement.problem import Placement, PlacementError, PlacementProblem

MODEL = model_config("tiny")            # L = 2 MoE layers, E = 8 experts, top-2
N, L, E, K = 4, MODEL.n_moe_layers, MODEL.n_experts, MODEL.top_k


def _cluster():
  return cluster_config("edge_hetero_4")


def _freq(hot_of_server):
  """[N, L, E] frequencies: server n sends 90% of its choices to its 2 hot experts per layer."""
  f = np.full((N, L, E), 0.1 / (E - 2))
  for n, hot in enumerate(hot_of_server):
    f[n, :, list(hot)] = 0.45
  return f * K


HOMES = [(0, 1), (2, 3), (4, 5), (6, 7)]
SWAPPED = [(2, 3), (0, 1), (6, 7), (4, 5)]


def _problem(freq, capacity=(6, 6, 6, 6), tokens=(16.0, 16.0, 16.0, 16.0)):
  return PlacementProblem.build(MODEL, _cluster(), freq, np.array(tokens), np.array(capacity))


def _round_robin(num_servers=N):
  h = np.zeros((num_servers, L, E), bool)
  for l in range(L):
    for e in range(E):
      h[(l * E + e) % num_servers, l, e] = True
  return h


def _placement(hosts, problem):
  return Placement.from_hosts(hosts, MODEL, problem.cluster, problem.traffic)


def _random_hosts(rng, capacity):
  """Valid random hosts: every expert once, then random extra replicas within capacity."""
  while True:
    h = np.zeros((N, L, E), bool)
    for l in range(L):
      for e in range(E):
        h[rng.integers(N), l, e] = True
    if np.all(h.sum(axis=(1, 2)) <= capacity):
      break
  for _ in range(20):
    n, l, e = rng.integers(N), rng.integers(L), rng.integers(E)
    if h[n].sum() < capacity[n]:
      h[n, l, e] = True
  return h


# ---- slots ---------------------------------------------------------------------------------
def test_assign_slots_stable_keeps_kept_experts_in_place():
  rng = np.random.default_rng(0)
  cap = np.array([9, 9, 9, 9])
  for _ in range(20):
    old_h, new_h = _random_hosts(rng, cap), _random_hosts(rng, cap)
    old = Placement.from_hosts(old_h, MODEL, _cluster())
    # A scrambled (but consistent) old table: stable assignment must follow it, not left-packing.
    perm = np.stack([[rng.permutation(old.num_slots) for _ in range(L)] for _ in range(N)])
    old_slots = np.take_along_axis(old.slot_expert, perm, axis=2)
    new_slots = mig.assign_slots_stable(old_slots, new_h)
    new = Placement(new_h, Placement.from_hosts(new_h, MODEL, _cluster()).route, new_slots)
    new.validate()  # consistent with hosts
    assert new_slots.shape[2] >= old_slots.shape[2]
    old_es = Placement(old_h, old.route, old_slots).expert_slot
    kept = old_h & new_h
    np.testing.assert_array_equal(new.expert_slot[kept], old_es[kept])


def test_validate_accepts_any_consistent_slot_table_and_rejects_others():
  p = _placement(_round_robin(), _problem(_freq(HOMES)))
  flipped = p.slot_expert[:, :, ::-1].copy()
  Placement(p.hosts, p.route, flipped).validate()
  dup = p.slot_expert.copy()
  dup[0, 0, 1] = dup[0, 0, 0]
  with pytest.raises(PlacementError, match="slot"):
    Placement(p.hosts, p.route, dup).validate()
  stray = p.slot_expert.copy()
  stray[0, 0, 0] = int(np.flatnonzero(~p.hosts[0, 0])[0])
  with pytest.raises(PlacementError, match="slot"):
    Placement(p.hosts, p.route, stray).validate()


# ---- move schedules ------------------------------------------------------------------------
def test_move_cost_reaches_target_and_respects_links_and_capacity():
  rng = np.random.default_rng(1)
  cap = np.array([8, 7, 6, 9])
  prob = _problem(_freq(HOMES), capacity=cap)
  for c in (1, 2):
    for _ in range(10):
      cur = _placement(_random_hosts(rng, cap), prob)
      tgt = _placement(_random_hosts(rng, cap), prob)
      plan = mig.move_cost(cur, tgt, MODEL, prob.cluster, cap, max_concurrent_per_link=c)
      np.testing.assert_array_equal(mig.apply_steps(cur.hosts, plan.steps), tgt.hosts)
      assert plan.moves == int((tgt.hosts & ~cur.hosts).sum())
      assert plan.bytes == plan.moves * MODEL.expert_bytes
      assert mig.hosted_at_every_moment(cur.hosts, plan.steps, None)
      if plan.staged == 0:
        assert mig.hosted_at_every_moment(cur.hosts, plan.steps, cap)
      links = {}
      for s in plan.steps:
        if s.kind == "copy":
          links[(s.round, s.source, s.server)] = links.get((s.round, s.source, s.server), 0) + 1
      assert max(links.values(), default=0) <= c
      assert len(plan.round_seconds) == len({s.round for s in plan.steps if s.kind == "copy"})


def test_single_copy_takes_latency_plus_bytes_over_bandwidth():
  prob = _problem(_freq(HOMES))
  h = _round_robin()
  cur = _placement(h, prob)
  h2 = h.copy()
  l, e = 0, 1                       # held by server 1 in the round robin
  assert h[1, l, e]
  h2[3, l, e] = True
  plan = mig.move_cost(cur, _placement(h2, prob), MODEL, prob.cluster, prob.capacity)
  bw, lat = prob.cluster.bandwidth_matrix[1, 3], prob.cluster.latency_matrix[1, 3]
  assert plan.moves == 1 and plan.rounds == 1
  assert plan.seconds == pytest.approx(lat + MODEL.expert_bytes / bw)
  (step,) = plan.steps
  assert (step.kind, step.server, step.source) == ("copy", 3, 1)


def test_swapping_sole_copies_between_full_servers_needs_staging():
  cap = np.array([4, 4, 4, 4])
  prob = _problem(_freq(HOMES), capacity=cap)
  h = _round_robin()                # every server holds exactly 4 = capacity, all sole copies
  t = h.copy()
  t[[0, 1]] = h[[1, 0]]             # servers 0 and 1 trade everything
  plan = mig.move_cost(_placement(h, prob), _placement(t, prob), MODEL, prob.cluster, cap)
  assert plan.staged > 0
  assert mig.hosted_at_every_moment(h, plan.steps)          # nothing ever unhosted ...
  assert not mig.hosted_at_every_moment(h, plan.steps, cap)  # ... but only with a buffer


def test_hosted_at_every_moment_catches_dropping_a_sole_copy_first():
  h = _round_robin()
  bad = [mig.MoveStep("drop", 0, 0, 0, round=0), mig.MoveStep("copy", 1, 0, 0, 0, round=0)]
  assert not mig.hosted_at_every_moment(h, bad)
  h2 = h.copy()
  h2[2, 0, 0] = True
  good = [mig.MoveStep("copy", 1, 0, 0, 0, round=0), mig.MoveStep("drop", 0, 0, 0, round=1)]
  assert mig.hosted_at_every_moment(h, good)
  assert not mig.hosted_at_every_moment(h, [mig.MoveStep("copy", 1, 0, 0, 2, round=0)])


# ---- incremental planning and the trigger --------------------------------------------------
def test_plan_incremental_respects_budget_slots_and_every_moment():
  prob = _problem(_freq(HOMES))
  cur = _placement(_round_robin(), prob)
  for budget in (1, 3, None):
    new = mig.plan_incremental(prob, cur, max_moves=budget)
    moves = new.info["moves"]
    assert len(moves) == int((new.hosts & ~cur.hosts).sum())
    if budget is not None:
      assert len(moves) <= budget
    assert objective(prob, new) < objective(prob, cur)
    new.validate(prob)
    kept = cur.hosts & new.hosts
    np.testing.assert_array_equal(new.expert_slot[kept], cur.expert_slot[kept])
    plan = mig.move_cost(cur, new, MODEL, prob.cluster, prob.capacity,
                         sequence=mig.move_sequence(new))
    assert plan.staged == 0
    assert mig.hosted_at_every_moment(cur.hosts, plan.steps, prob.capacity)
  by_bytes = mig.plan_incremental(prob, cur, max_bytes=2.5 * MODEL.expert_bytes)
  assert len(by_bytes.info["moves"]) <= 2


def test_plan_incremental_local_optimum_reaches_hot_experts():
  """With room for the hot set, an unlimited plan makes every server hold its own hot experts."""
  prob = _problem(_freq(HOMES))
  new = mig.plan_incremental(prob, _placement(_round_robin(), prob))
  for n, hot in enumerate(HOMES):
    assert new.hosts[n][:, list(hot)].all()


def test_trigger_no_migration_when_statistics_unchanged():
  prob = _problem(_freq(HOMES))
  settled = mig.plan_incremental(prob, _placement(_round_robin(), prob))
  again = mig.plan_incremental(prob, settled, max_moves=8)
  assert again.info["moves"] == []
  d = mig.should_migrate(prob, settled, again, steps_per_interval=1e6)
  assert not d.migrate and d.gain_s == 0.0
  d2 = mig.should_migrate(prob, settled, settled, steps_per_interval=1e6)
  assert not d2.migrate


def test_trigger_migrates_when_workload_swapped_and_budget_allows():
  before = _problem(_freq(HOMES))
  settled = mig.plan_incremental(before, _placement(_round_robin(), before))
  after = _problem(_freq(SWAPPED))
  cand = mig.plan_incremental(after, settled, max_moves=8)
  assert 0 < len(cand.info["moves"]) <= 8
  d = mig.should_migrate(after, settled, cand, steps_per_interval=1e5)
  assert d.migrate and d.gain_s > 2.0 * d.cost_s > 0
  assert d.move.moves == len(cand.info["moves"])
  # The same move is not worth it when the interval is too short to earn the transfer back.
  short = mig.should_migrate(after, settled, cand, steps_per_interval=1e-3)
  assert not short.migrate
  # A candidate that serves worse is refused whatever the interval.
  worse = mig.should_migrate(before, settled, cand, steps_per_interval=1e9)
  assert not worse.migrate and worse.saving_per_step_s < 0


# ---- failure drill -------------------------------------------------------------------------
def test_failure_with_replicas_leaves_nothing_unreachable():
  prob = _problem(_freq(HOMES), capacity=(8, 8, 8, 8))
  h = _round_robin()
  h[1] |= h[0]                      # everything server 0 holds also lives on server 1
  p = _placement(h, prob)
  new, rep = mig.fail_server(p, 0, prob)
  assert rep.orphans == () and rep.unreachable_during_recovery == ()
  assert rep.reloads == () and rep.storage_bytes == 0 and rep.recovery_s == 0
  assert rep.lost_replicas == int(h[0].sum())
  assert not new.hosts[0].any() and not np.any(new.route == 0)
  new.validate(mig.failed_problem(prob, 0))


def test_failure_replaces_sole_holder_experts_from_storage():
  cap = (6, 6, 6, 6)
  prob = _problem(_freq(HOMES), capacity=cap)
  h = _round_robin()                # all sole copies: server 2 holds 4 experts alone
  p = _placement(h, prob)
  sbw = 1e9
  new, rep = mig.fail_server(p, 2, prob, storage_bandwidth=sbw)
  alone = {tuple(int(x) for x in o) for o in np.argwhere(h[2])}
  assert set(rep.orphans) == alone
  for l, e in alone:
    assert new.hosts[:, l, e].any() and not new.hosts[2, l, e]
  assert rep.storage_bytes == len(alone) * MODEL.expert_bytes
  loads = np.bincount([m for m, _, _ in rep.reloads], minlength=N)
  assert rep.recovery_s == pytest.approx(loads.max() * MODEL.expert_bytes / sbw)
  new.validate(mig.failed_problem(prob, 2))
  kept = p.hosts & new.hosts
  np.testing.assert_array_equal(new.expert_slot[kept], p.expert_slot[kept])


def test_failure_evicts_spare_replicas_when_memory_is_full():
  cap = np.array([6, 6, 6, 6])
  prob = _problem(_freq(HOMES), capacity=cap)
  h = _round_robin()                # 4 sole copies each; fill the last 2 slots with spares
  for n, of in ((0, 1), (1, 3), (2, 3), (3, 0)):
    spare = np.argwhere(_round_robin()[of])[:2]
    h[n, spare[:, 0], spare[:, 1]] = True
  assert np.all(h.sum(axis=(1, 2)) == cap)
  p = _placement(h, prob)
  new, rep = mig.fail_server(p, 2, prob)
  assert len(rep.orphans) == 4 and len(rep.reloads) == 4 and len(rep.evicted) == 4
  for m, l, e in rep.evicted:
    assert h[m, l, e] and not new.hosts[m, l, e]
    assert new.hosts[:, l, e].any()  # only spare copies were evicted
  new.validate(mig.failed_problem(prob, 2))


def test_failure_errors():
  prob = _problem(_freq(HOMES), capacity=(4, 4, 4, 4))
  p = _placement(_round_robin(), prob)
  with pytest.raises(mig.MigrationError, match="does not exist"):
    mig.fail_server(p, 7, prob)
  with pytest.raises(mig.MigrationError, match="surviving servers hold"):
    mig.fail_server(p, 0, prob)


def test_relocation_frees_a_server_full_of_sole_copies():
  """Servers 0-2 are full of sole copies; server 0 now wants experts 1 and 5, sole copies on
  server 1. Only relocating one of its own sole copies to server 3 (idle, with room) lets it
  take one: two copies for one gain."""
  hot = [(1, 5), (1, 5), (2, 6), (3, 7)]
  prob = _problem(_freq(hot), capacity=(4, 4, 4, 8), tokens=(16.0, 16.0, 16.0, 0.0))
  cur = _placement(_round_robin(), prob)  # server n holds experts n and n + 4 of each layer
  fixed = mig.plan_incremental(prob, cur, max_moves=2, relocate=False)
  assert fixed.info["moves"] == []
  moved = mig.plan_incremental(prob, cur, max_moves=2, relocate=True)
  assert len(moved.info["moves"]) == 2
  assert (moved.hosts[0] & ~cur.hosts[0])[:, [1, 5]].any()
  assert objective(prob, moved) < objective(prob, cur)
  plan = mig.move_cost(cur, moved, MODEL, prob.cluster, prob.capacity,
                       sequence=mig.move_sequence(moved))
  assert plan.moves == 2 and plan.staged == 0
  assert mig.hosted_at_every_moment(cur.hosts, plan.steps, prob.capacity)


def test_move_cost_rejects_a_sequence_of_another_plan():
  prob = _problem(_freq(HOMES))
  cur = _placement(_round_robin(), prob)
  new = mig.plan_incremental(prob, cur, max_moves=3)
  with pytest.raises(mig.MigrationError, match="sequence"):
    mig.move_cost(cur, new, MODEL, prob.cluster, prob.capacity,
                  sequence=mig.move_sequence(new)[:-1])


def _bound_reference(prob, hosts, target):
  """Plain-loop version of min_copies_for_coverage."""
  x = prob.traffic
  cov = (x * hosts).sum() / x.sum()
  if cov >= target:
    return 0
  gains = []
  for n in range(N):
    missing = sorted((x[n, l, e] for l in range(L) for e in range(E) if not hosts[n, l, e]),
                     reverse=True)
    held = sorted(x[n, l, e] for l in range(L) for e in range(E) if hosts[n, l, e])
    room = max(int(prob.capacity[n]) - len(held), 0)
    for j, a in enumerate(missing):
      if j < room:
        gains.append(a)
      elif j - room < len(held):
        gains.append(a - held[j - room])
  gains = sorted((g for g in gains if g > 0), reverse=True)
  for k in range(1, len(gains) + 1):
    if cov + sum(gains[:k]) / x.sum() >= target - 1e-12:
      return k
  return None


def test_min_copies_for_coverage_matches_reference_and_bounds_the_planner():
  rng = np.random.default_rng(4)
  for cap in ((6, 6, 6, 6), (4, 4, 4, 5)):
    prob = _problem(_freq(SWAPPED), capacity=cap)
    cur = _placement(_round_robin(), prob)
    base = mig.local_coverage(prob, cur.hosts)
    for target in (base, base + 0.05, base + 0.2, base + 0.4, 1.5):
      assert mig.min_copies_for_coverage(prob, cur, target) == _bound_reference(
          prob, cur.hosts, target)
    for budget in (1, 2, 4, 8):
      plan = mig.plan_incremental(prob, cur, max_moves=budget)
      cov = mig.local_coverage(prob, plan.hosts)
      assert mig.min_copies_for_coverage(prob, cur, cov) <= len(plan.info["moves"])
  freq = rng.dirichlet(np.full(E, 0.3), size=(N, L)) * K
  prob = _problem(freq, capacity=(5, 4, 4, 6))
  cur = _placement(_random_hosts(rng, prob.capacity), prob)
  for target in np.linspace(0.3, 1.0, 8):
    assert mig.min_copies_for_coverage(prob, cur, target) == _bound_reference(
        prob, cur.hosts, target)


def test_cross_validated_saving_with_equal_halves_is_the_in_sample_saving():
  prob = _problem(_freq(SWAPPED))
  cur = _placement(_round_robin(), prob)
  planner = lambda p: mig.plan_incremental(p, cur, max_moves=2)  # noqa: E731
  got = mig.cross_validated_saving(prob, prob, cur, planner)
  want = mig.expected_latency(prob, cur) - mig.expected_latency(prob, planner(prob))
  assert got == pytest.approx(want)
  d = mig.should_migrate(prob, cur, planner(prob), 1e6, saving_per_step=-1.0)
  assert not d.migrate and d.saving_per_step_s == -1.0


def test_full_replan_counts_added_replicas_and_keeps_slots():
  before = _problem(_freq(HOMES))
  cur = mig.plan_incremental(before, _placement(_round_robin(), before))
  after = _problem(_freq(SWAPPED))
  new = mig.full_replan(after, cur, "dancemoe")
  new.validate(after)
  assert new.info["moves"] == int((new.hosts & ~cur.hosts).sum())
  assert new.info["changed_experts"] == int(np.any(new.hosts != cur.hosts, axis=0).sum())
  kept = cur.hosts & new.hosts
  np.testing.assert_array_equal(new.expert_slot[kept], cur.expert_slot[kept])


def test_random_plans_give_valid_sequences():
  """Plans on random skewed workloads and starting placements (tight memory, so evictions and
  relocations happen) always come with a sequence that schedules without a buffer."""
  rng = np.random.default_rng(5)
  cap = np.array([5, 4, 4, 6])
  for _ in range(6):
    freq = rng.dirichlet(np.full(E, 0.3), size=(N, L)) * K
    prob = _problem(freq, capacity=cap)
    cur = _placement(_random_hosts(rng, cap), prob)
    new = mig.plan_incremental(prob, cur, max_moves=int(rng.integers(2, 12)))
    seq = mig.move_sequence(new)
    plan = mig.move_cost(cur, new, MODEL, prob.cluster, cap, sequence=seq)
    assert plan.staged == 0 and plan.moves == len(seq)
    np.testing.assert_array_equal(mig.apply_steps(cur.hosts, plan.steps), new.hosts)
    assert mig.hosted_at_every_moment(cur.hosts, plan.steps, cap)


# ---- prefixes: how many of a plan's moves to make ------------------------------------------
def _swapped_plan(max_moves=8):
  before = _problem(_freq(HOMES))
  settled = mig.plan_incremental(before, _placement(_round_robin(), before))
  after = _problem(_freq(SWAPPED))
  return after, settled, mig.plan_incremental(after, settled, max_moves=max_moves)


def test_plan_prefix_is_the_smaller_budget_plan_and_schedules():
  after, cur, plan = _swapped_plan()
  seq = mig.move_sequence(plan)
  assert len(seq) == 8
  assert mig.plan_prefix(after, cur, plan, len(seq)) is plan
  for k in range(len(seq)):
    pre = mig.plan_prefix(after, cur, plan, k)
    pre.validate(after)
    assert mig.move_sequence(pre) == seq[:k]
    # The greedy's prefix is its plan of budget k (no relocation to cut in half here).
    np.testing.assert_array_equal(pre.hosts, mig.plan_incremental(after, cur, k).hosts)
    kept = cur.hosts & pre.hosts
    np.testing.assert_array_equal(pre.expert_slot[kept], cur.expert_slot[kept])
    steps = mig.move_cost(cur, pre, MODEL, after.cluster, after.capacity,
                          sequence=mig.move_sequence(pre)).steps
    assert mig.hosted_at_every_moment(cur.hosts, steps, after.capacity)
  with pytest.raises(mig.MigrationError, match="prefix of 9 moves"):
    mig.plan_prefix(after, cur, plan, 9)


def test_prefix_grid():
  assert mig.prefix_grid(0, 16) == []
  assert mig.prefix_grid(40, 16) == [16, 32, 40]
  assert mig.prefix_grid(32, 16) == [16, 32]
  assert mig.prefix_grid(7, 0) == [7]


def test_choose_prefix_makes_no_move_the_saving_does_not_pay_for():
  """Saving grows over the first m copies and then stays flat: the trigger makes exactly m
  (more copies cost transfer time and bring nothing); with no saving it makes none."""
  after, cur, plan = _swapped_plan()
  full = mig.expected_latency(after, cur) - mig.expected_latency(after, plan)
  assert full > 0
  for m in (2, 5):
    got = mig.choose_prefix(after, cur, plan, 1e5, lambda k, m=m: full * min(k, m) / m, step=1)
    assert got.migrate and got.moves == m
    assert [row[0] for row in got.table] == list(range(1, 9))
    assert got.decision.move.moves == m
    nets = [g - 2.0 * c for _, _, g, c in got.table]
    assert nets[m - 1] == max(nets)
  none = mig.choose_prefix(after, cur, plan, 1e5, lambda k: 0.0, step=1)
  assert not none.migrate and none.moves == 0 and not none.decision.migrate
  # Too short an interval to earn any prefix back: no migration either.
  assert not mig.choose_prefix(after, cur, plan, 1e-3, step=1).migrate
  # step 0: only the whole plan is judged (all or nothing).
  whole = mig.choose_prefix(after, cur, plan, 1e5, step=0)
  assert len(whole.table) == 1 and whole.moves == 8


def test_choose_prefix_on_unchanged_statistics_does_not_migrate():
  prob = _problem(_freq(HOMES))
  settled = mig.plan_incremental(prob, _placement(_round_robin(), prob))
  again = mig.plan_incremental(prob, settled, max_moves=8)
  got = mig.choose_prefix(prob, settled, again, 1e6, step=1)
  assert not got.migrate and got.table == ()


def test_cross_validated_savings_per_prefix():
  after, cur, _ = _swapped_plan()
  planner = lambda p: mig.plan_incremental(p, cur, max_moves=6)  # noqa: E731
  savings = mig.cross_validated_savings(after, after, cur, planner)
  plan = planner(after)
  base = mig.expected_latency(after, cur)
  for k in range(7):
    want = base - mig.expected_latency(after, mig.plan_prefix(after, cur, plan, k))
    assert savings(k) == pytest.approx(want)
  assert savings(6) == pytest.approx(mig.cross_validated_saving(after, after, cur, planner))
  assert savings(50) == pytest.approx(savings(6))  # a plan shorter than k counts whole
