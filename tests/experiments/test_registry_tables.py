"""A method registered in this file alone appears in the tables, the headline, the plots' colours
and the experiment config's method lists, with no other edit (docs/DESIGN.md, "Adding a
placement method")."""
import dataclasses

import numpy as np
import pytest

from moe_edge.config import ConfigError
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.experiments.config import load_experiment, with_overrides
from moe_edge.experiments.plots import OTHER_COLOR, method_color
from moe_edge.experiments.tables import compute_rows, headline
from moe_edge.placement import registry
from moe_edge.placement.registry import NoOptions, PlacementContext


@dataclasses.dataclass(frozen=True)
class ToyOptions:
  """The toy's one option: which server holds every expert first."""
  first: int = 0


def toy(problem: PlacementProblem, options: ToyOptions, context: PlacementContext) -> Placement:
  """Every expert on server ``first``, then round robin into free memory."""
  n, l, e = problem.shape
  hosts = np.zeros((n, l, e), dtype=bool)
  owner = (options.first + np.arange(l * e)) % n
  room = problem.capacity.copy()
  for i, s in enumerate(owner):
    while room[s] == 0:
      s = (s + 1) % n
    hosts[s, i // e, i % e] = True
    room[s] -= 1
  return Placement.from_hosts(hosts, problem.model, problem.cluster, problem.traffic,
                              method="toy", hardware=problem.hardware)


@pytest.fixture
def toy_registered():
  registry.register("toy", "baseline", ToyOptions)(toy)
  yield
  registry.unregister("toy")


def test_a_registered_method_is_in_the_tables(toy_registered, shared_data):
  cfg = with_overrides(load_experiment("demo"), tokens_per_server=256,
                       models=("mixtral_8x7b",), methods=("dancemoe", "baseline"))
  assert "toy" in cfg.methods and cfg.methods[0] == "dancemoe"
  rows, _ = compute_rows(cfg)
  toy_row = next(r for r in rows if r["method"] == "toy")
  assert toy_row["status"] == "ok" and toy_row["decode_ms"] > 0
  head = headline(rows)
  assert "toy" in head["decode"] and head["decode"]["toy"]["settings"] == 1
  assert method_color("toy") not in (OTHER_COLOR, method_color("uniform_ep"))
  assert registry.get("toy").doc.startswith("Every expert on server")


def test_registry_checks_its_input(toy_registered):
  assert registry.role("toy") == "baseline" and "toy" in registry.names("baseline")
  with pytest.raises(PlacementError, match="role 'winner'"):
    registry.register("toy2", "winner")(toy)
  with pytest.raises(PlacementError, match="frozen dataclass"):
    registry.register("toy2", "baseline", dict)(toy)
  with pytest.raises(PlacementError, match="registered twice"):
    registry.register("toy", "baseline", NoOptions)(lambda p, o, c: None)
  with pytest.raises(PlacementError, match=r"no option\(s\) \['second'\].*first"):
    registry.make_options("toy", {"second": 1})
  with pytest.raises(PlacementError, match="unknown placement method 'toy3'.*toy"):
    registry.get("toy3")
  with pytest.raises(ConfigError, match="unknown methods entry 'toy3'"):
    with_overrides(load_experiment("demo"), methods=("toy3",))
  assert registry.make_options("toy", {"first": 2}) == ToyOptions(2)
