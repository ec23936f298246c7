"""The experiment presets (ml_collections ConfigDicts) build their validated frozen configs, and
bad values fail with a ConfigError naming the setting."""
import importlib.util
import math
from pathlib import Path

import pytest

from moe_edge.config import ConfigError
from moe_edge.experiments.config import build_experiment, load_experiment
from moe_edge.experiments.extension_settings import BudgetSweepConfig, SubstitutionSweepConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "experiments"


def _preset(name):
  spec = importlib.util.spec_from_file_location(f"_t_{name}", PRESETS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_extension_presets_build():
  sub = SubstitutionSweepConfig.from_flat(_preset("substitution_sweep").to_dict())
  assert sub == SubstitutionSweepConfig()  # the preset states the defaults
  bud = BudgetSweepConfig.from_flat(_preset("budget_sweep").to_dict())
  assert bud == BudgetSweepConfig() and math.isinf(bud.budget_units[-1])
  assert bud.harness.method == "dancemoe" and bud.harness.copies == 1.5


@pytest.mark.parametrize("cls, name, change, message", [
    (SubstitutionSweepConfig, "substitution_sweep", dict(similarities=("output", "cosmic")),
     "unknown similarities"),
    (SubstitutionSweepConfig, "substitution_sweep", dict(thresholds=(0.2, 0.5)),
     "thresholds must include 0"),
    (SubstitutionSweepConfig, "substitution_sweep", dict(copies=0.5), "copies must be >= 1"),
    (BudgetSweepConfig, "budget_sweep", dict(variants=("force+maybe",)), "bad variant"),
    (BudgetSweepConfig, "budget_sweep", dict(budget_units=("1", "lots")), "budget_units"),
    (BudgetSweepConfig, "budget_sweep", dict(solver="magic"), "solver"),
    (BudgetSweepConfig, "budget_sweep", dict(colour="red"), "unknown settings"),
])
def test_extension_settings_reject_bad_values(cls, name, change, message):
  with pytest.raises(ConfigError, match=message):
    cls.from_flat(dict(_preset(name).to_dict(), **change))


def test_experiment_presets_are_config_dicts():
  cfg = _preset("edge_tables")
  assert build_experiment(cfg) == load_experiment("edge_tables")
  cfg.link_gbps = 0.5  # an override, as --config.link_gbps=0.5 makes it
  assert build_experiment(cfg).link_gbps == 0.5
  cfg.link_gbps = -1.0
  with pytest.raises(ConfigError, match="link_gbps must be positive"):
    build_experiment(cfg)
  with pytest.raises(ConfigError, match="unknown ExperimentConfig fields"):
    build_experiment(dict(_preset("demo").to_dict(), colour="red"))


@pytest.mark.parametrize("value", [-1, 2.5])
def test_a_bad_lp_bound_size_limit_is_refused(value):
  cfg = _preset("edge_tables")
  assert build_experiment(cfg).bound_lp_max_cells == 100_000
  with pytest.raises(ConfigError, match="bound_lp_max_cells must be an integer >= 0"):
    build_experiment(dict(cfg.to_dict(), bound_lp_max_cells=value))
