"""The demo preset's tables regenerate to the committed ``results/demo/tables.csv``: stale
results (a method, the cost model or the workload changed without regenerating) fail here."""
import math
from pathlib import Path

from moe_edge.experiments.config import load_experiment
from moe_edge.experiments.tables import COLUMNS, compute_rows, read_rows

COMMITTED = Path(__file__).resolve().parents[2] / "results" / "demo" / "tables.csv"
COMMAND = ".venv/bin/python experiments/reproduce_tables.py --config demo --out results/demo"


def _same(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    if a is None or b is None:
      return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
  return a == b


def test_demo_tables_match_the_committed_csv(shared_data):
  committed = read_rows(COMMITTED)
  rows, _ = compute_rows(load_experiment("demo"))
  fresh = [{k: r.get(k) for k in COLUMNS} for r in rows]
  key = lambda r: (r["model"], r["cluster"], r["method"])  # noqa: E731
  assert [key(r) for r in fresh] == [key(r) for r in committed], (
      f"the demo's settings or methods changed; regenerate with: {COMMAND}")
  for new, old in zip(fresh, committed):
    diff = {k: (old[k], new[k]) for k in COLUMNS
            if not _same(new[k] if new[k] != "" else None, old[k])}
    assert not diff, (f"{key(new)} changed {diff}; if intended, regenerate with: {COMMAND} "
                      f"and say why in the commit")
