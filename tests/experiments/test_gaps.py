"""Issue 18's goal table: a setting the lower bound rules out is marked "unreachable (bound)" for
that goal only, with the largest reduction the bound allows, and the means exclude it."""
from moe_edge.experiments.gaps import format_goal_table, format_goals


def _row(setting, method, decode, planned, bound, request=None):
  request = decode if request is None else request
  return dict(model=setting, cluster="c", method=method, status="ok", decode_ms=decode,
              planned_decode_ms=planned, bound_decode_ms=bound, request_ms=request,
              planned_request_ms=planned, bound_request_ms=bound,
              gap_to_bound=planned / bound - 1.0, decode_gap_to_bound=planned / bound - 1.0)


ROWS = [
    # a: bound 50 below 0.8 x 100 and 0.7 x 110: both goals reachable
    _row("a", "ours", 70.0, 70.0, 50.0), _row("a", "b1", 100.0, 100.0, 50.0),
    _row("a", "prism", 110.0, 110.0, 50.0), _row("a", "best_known", 69.0, 69.0, 50.0),
    # b: bound 75 >= 0.7 x prism's 100 (30% ruled out) but < 0.8 x b1's 100 (20% allowed)
    _row("b", "ours", 90.0, 90.0, 75.0), _row("b", "b1", 100.0, 100.0, 75.0),
    _row("b", "prism", 100.0, 100.0, 75.0), _row("b", "best_known", 88.0, 88.0, 75.0),
]


def test_goal_table_marks_only_the_ruled_out_goal():
  table = format_goal_table(ROWS, "ours", ("b1",)).splitlines()
  assert table[0].count("|") == 7 and "vs prism (goal -30%)" in table[0]
  a, b = (next(line for line in table if line.startswith(f"| {s}/c ")) for s in "ab")
  assert "unreachable" not in a and "bound allows -50.0%" in a and "-30.00%" in a
  cells = [c.strip() for c in b.split("|")[1:-1]]
  assert cells[1] == "-10.00%; bound allows -25.0%"                # 20% vs b1: reachable
  assert cells[2] == "-10.00%; **unreachable (bound)**: at most -25.0%"  # 30% vs prism
  assert cells[-1] == "+17.33% / +17.33%"                          # best_known 88 vs bound 75


def test_goal_means_with_and_without_ruled_out_settings():
  text = format_goals(ROWS, "ours", ("b1",))
  prism = next(line for line in text.splitlines() if "decode" in line and "prism" in line)
  assert "without the 1 setting(s)" in prism and "b/c" in prism
  assert "36.4% lower over 1" in prism                             # a alone: 70 / 110
  best = next(line for line in text.splitlines() if "decode" in line and "best baseline" in line)
  assert "rules out no setting" in best
  only_b = [r for r in ROWS if r["model"] == "b"]
  assert "in every setting" in format_goals(only_b, "ours", ("b1",))


def test_the_mean_goal_is_unreachable_when_the_bound_allows_less_on_average():
  """b alone allows 25% (reachable), c only 10%: the geometric mean allows 1 - sqrt(0.75 x 0.9)
  = 17.8% < 20%, so no placement meets the mean goal although b is not ruled out by itself."""
  rows = [r for r in ROWS if r["model"] == "b"] + [
      _row("c", "ours", 95.0, 95.0, 90.0), _row("c", "b1", 100.0, 100.0, 90.0),
      _row("c", "prism", 100.0, 100.0, 90.0), _row("c", "best_known", 94.0, 94.0, 90.0)]
  best = next(line for line in format_goals(rows, "ours", ("b1",)).splitlines()
              if "decode" in line and "best baseline" in line)
  assert "allows at most 17.8% lower as a geometric mean over all 2" in best
  assert "**the goal is unreachable (bound)**" in best
  ok = next(line for line in format_goals(ROWS, "ours", ("b1",)).splitlines()
            if "decode" in line and "best baseline" in line)
  assert "as a geometric mean" in ok and "unreachable (bound)**" not in ok
